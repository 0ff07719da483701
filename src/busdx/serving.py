"""Web app and REST API: ``busdx serve --run RUNDIR``.

``create_app`` loads the model once and returns a FastAPI application:

* ``GET /`` a single page (no CDN): drop or choose images, see the probability against the
  threshold, the label and, on request, the Grad-CAM overlay;
* ``GET /health``, ``GET /model`` (model card facts), ``POST /predict`` (multipart field
  ``files``, one or several images), ``POST /explain`` (field ``file``; a PNG overlay);
* OpenAPI docs at ``/docs`` (served from the package, also offline).

Every user mistake is answered with a 4xx JSON body ``{"error": ..., "detail": ...}``; no
traceback ever leaves the server. Model work runs in worker threads, at most ``workers`` at a
time with at most ``queue_size`` requests waiting; beyond that the answer is 503. Off the
loopback interface an API key (header ``X-API-Key``) is required unless explicitly disabled.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from busdx import __version__
from busdx.errors import ConfigError, ImageDecodeError, ImageTooLargeError
from busdx.explain import explain_image
from busdx.imaging import decode_image
from busdx.inference import LoadedModel, load_model
from busdx.runs import load_run
from busdx.scope import image_checks
from busdx.transforms import build_eval_transform

__all__ = ["ServeSettings", "check_bind", "create_app"]

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"


@dataclass
class ServeSettings:
    """Limits and security of the service."""

    max_upload_mb: float = 20.0  # whole request body
    max_pixels: int = 50_000_000  # per image: refuse decompression bombs
    max_files: int = 32  # per /predict request
    workers: int = 1  # model calls at a time
    queue_size: int = 64  # requests waiting for a worker; more get 503
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    backend: str = "torch"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def check_bind(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """Refuse to serve beyond the loopback interface without an API key, unless told to."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key and not allow_no_key:
        raise ConfigError(
            f"binding to {host} exposes the model to the network: set an API key "
            "(--api-key or $BUSDX_API_KEY), or pass --no-api-key to serve without one"
        )


class _ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _json_error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class _Gate:
    """At most ``workers`` model calls at once and ``queue_size`` waiting; else 503."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.limiter = anyio.CapacityLimiter(workers)
        self.queue_size, self.waiting = queue_size, 0

    async def run(self, function: Any, *args: Any) -> Any:
        if self.waiting >= self.queue_size:
            raise _ApiError(503, "busy", "too many requests are waiting; retry shortly")
        self.waiting += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)
        finally:
            self.waiting -= 1


def _model_card(loaded: LoadedModel, run_dir: Path, backend: str) -> dict[str, Any]:
    metadata = loaded.metadata
    card: dict[str, Any] = {
        "busdx_version": metadata.get("busdx_version"),
        "server_version": __version__,
        "backend": backend,
        "model": metadata.get("model"),
        "classes": metadata["class_names"],
        "positive_class": metadata.get("positive_class"),
        "threshold": loaded.threshold,
        "threshold_policy": metadata.get("threshold_policy"),
        "temperature": loaded.temperature,
        "preprocessing": metadata["preprocessing"],
        "weights": metadata.get("weights"),
        "intended_use": "research use only; not a medical device",
    }
    try:
        _, info = load_run(run_dir)
        card["training_data"] = {"counts": info["counts"], "layout": info["layout"]}
    except Exception:  # a bare model file has no run directory around it
        card["training_data"] = None
    return card


def create_app(run: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving the model of ``run`` (a run directory or model file)."""
    settings = settings or ServeSettings()
    run_dir = Path(run)
    explainer = load_model(run_dir)  # torch: Grad-CAM needs gradients
    predictor = explainer if settings.backend == "torch" else load_model(run_dir, backend="onnx")
    transform = build_eval_transform(predictor.preprocessing)
    card = _model_card(
        predictor, run_dir if run_dir.is_dir() else run_dir.parent, predictor.backend
    )
    gate = _Gate(settings.workers, settings.queue_size)
    page = (resources.files("busdx") / "static" / "index.html").read_text("utf-8")

    app = FastAPIOffline(
        title="busdx",
        version=__version__,
        description="Benign vs malignant breast-ultrasound classification. Research use only; "
        "not a medical device.",
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"],
        )  # fmt: skip

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        """API key and body-size checks before any upload is read."""
        if request.method == "POST":
            if settings.api_key and not hmac.compare_digest(
                request.headers.get(API_KEY_HEADER, ""), settings.api_key
            ):
                return _json_error(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")
            length = request.headers.get("content-length")
            if length is not None and (
                not length.isdigit() or int(length) > settings.max_upload_bytes
            ):
                return _json_error(
                    413, "too_large", f"upload exceeds {settings.max_upload_mb:g} MB"
                )
        return await call_next(request)

    @app.exception_handler(_ApiError)
    async def api_error(_: Request, exc: _ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.error, exc.detail)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _json_error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, "invalid_request", str(exc.errors()[:1]))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")  # the traceback stays in the server log
        return _json_error(500, "internal_error", "the server could not process this request")

    async def _uploads(request: Request, field: str) -> list[tuple[str, bytes]]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise _ApiError(
                415,
                "unsupported_media_type",
                f"send multipart/form-data with image file(s) in the field {field!r}",
            )
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads carry no content-length
            body += chunk
            if len(body) > settings.max_upload_bytes:
                raise _ApiError(413, "too_large", f"upload exceeds {settings.max_upload_mb:g} MB")
        request._body = bytes(body)  # Starlette's own cache: form() parses these bytes
        try:
            form = await request.form(max_files=settings.max_files, max_fields=50)
        except Exception as exc:
            raise _ApiError(400, "bad_multipart", f"cannot parse the upload ({exc})") from exc
        files = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
        if not files:
            raise _ApiError(422, "missing_file", f"no file in the form field {field!r}")
        return [(item.filename or "upload", await item.read()) for item in files]

    def _decode(name: str, data: bytes) -> Any:
        try:
            return decode_image(data, name, max_pixels=settings.max_pixels)
        except ImageTooLargeError as exc:
            raise _ApiError(413, "image_too_large", str(exc)) from exc
        except ImageDecodeError as exc:
            raise _ApiError(400, "bad_image", str(exc)) from exc

    def _predict(images: list[Any]) -> list[tuple[float, bool | None]]:
        batch = torch.stack([transform(image) for image in images])
        logits, distances = predictor.predict(batch)
        distances = [None] * len(images) if distances is None else distances.tolist()
        return [
            (probability, image_checks(image), distance)
            for probability, image, distance in zip(
                predictor.probabilities(logits).tolist(), images, distances, strict=True
            )
        ]

    def _row(
        name: str,
        probability: float,
        checks: list[str] | None = None,
        distance: float | None = None,
    ) -> dict[str, Any]:
        checks = checks or []
        return {"filename": name, "probability_malignant": round(probability, 6),
                "label": predictor.label(probability), "threshold": predictor.threshold,
                "out_of_scope": predictor.out_of_scope(checks, distance),
                "scope_reason": predictor.scope_reason(checks, distance),
                "error": None}  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok", "backend": predictor.backend,
                "api_key_required": bool(settings.api_key)}  # fmt: skip

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """Model card: version, classes, threshold, preprocessing, training data."""
        return card

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        """Probability of malignancy for each uploaded image (multipart field ``files``).

        An unreadable file gets an error in its own row; if no file is readable the answer is
        the first file's 4xx error.
        """
        started = time.perf_counter()
        uploads = await _uploads(request, "files")
        rows: list[dict[str, Any]] = []
        images, first_error = [], None
        for name, data in uploads:
            try:
                images.append((len(rows), _decode(name, data)))
                rows.append({"filename": name})
            except _ApiError as exc:
                first_error = first_error or exc
                rows.append({"filename": name, "probability_malignant": None, "label": None,
                             "threshold": predictor.threshold, "out_of_scope": None,
                             "scope_reason": None, "error": exc.detail})  # fmt: skip
        if not images:
            raise first_error
        results = await gate.run(_predict, [image for _, image in images])
        for (index, _), result in zip(images, results, strict=True):
            rows[index] = _row(rows[index]["filename"], *result)
        elapsed = (time.perf_counter() - started) * 1000
        return {"predictions": rows, "timing_ms": round(elapsed, 1), "backend": predictor.backend}

    @app.post("/explain", responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request, format: str = "png") -> Response:
        """Grad-CAM overlay at the image's original size (field ``file``).

        ``format=png`` (default) returns the PNG, with the decision in ``X-Probability`` and
        ``X-Label`` headers; ``format=json`` returns the decision and a base64 PNG.
        """
        if format not in {"png", "json"}:
            raise _ApiError(422, "invalid_request", "format must be png or json")
        started = time.perf_counter()
        (name, data), *_ = await _uploads(request, "file")
        image = _decode(name, data)
        result = await gate.run(explain_image, explainer, image)
        buffer = io.BytesIO()
        result.overlay.save(buffer, format="PNG")
        row = _row(name, result.probability, image_checks(image)) | {"label": result.label}
        if format == "json":
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            elapsed = (time.perf_counter() - started) * 1000
            return JSONResponse({**row, "overlay_png_base64": encoded, "timing_ms": elapsed})
        headers = {"X-Probability": str(row["probability_malignant"]), "X-Label": row["label"]}
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)

    app.state.gate = gate
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
