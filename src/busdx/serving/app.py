"""The application, assembled from the layers, and the server that runs it."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from busdx import __version__
from busdx.serving.deps import load_service
from busdx.serving.errors import add_error_handlers
from busdx.serving.guard import RequestGuard
from busdx.serving.routes import dicom, explain, info, predict
from busdx.serving.settings import ServeSettings, check_bind

__all__ = ["create_app", "serve"]

logger = logging.getLogger("busdx.serving")


def create_app(run: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving the model of ``run`` (a run directory or model file);
    the model is loaded here, once."""
    settings = settings or ServeSettings()
    app = FastAPIOffline(
        title="busdx",
        version=__version__,
        description="Benign vs malignant breast-ultrasound classification. Research use only; "
        "not a medical device.",
    )
    app.state.service = load_service(run, settings)
    routers = [module.router for module in (info, predict, explain, dicom)]
    for router in routers:
        app.include_router(router)
    uploads = frozenset(r.path for x in routers for r in x.routes if "POST" in r.methods)
    app.add_middleware(RequestGuard, settings=settings, paths=uploads)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"],
        )  # fmt: skip
    add_error_handlers(app)
    return app


def serve(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    allow_no_key: bool = False,
) -> None:
    """Run the app with uvicorn until interrupted; in-flight requests finish on shutdown."""
    import uvicorn

    settings = settings or ServeSettings()
    check_bind(host, settings.api_key, allow_no_key)
    app = create_app(run, settings)
    logger.info("busdx serving %s on http://%s:%d (docs at /docs)", run, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
