"""``GET /``, ``/health`` and ``/model``: the page and what the server runs."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from busdx.serving.deps import Service
from busdx.serving.schemas import Health

router = APIRouter()


@cache
def _page() -> str:
    """The web page, read from the package once."""
    return (resources.files("busdx") / "static" / "index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/health")
async def health(service: Service) -> Health:
    """Liveness: the model is loaded and the server answers."""
    return Health(status="ok", backend=service.predictor.backend,
                  api_key_required=bool(service.settings.api_key))  # fmt: skip


@router.get("/model")
async def model(service: Service) -> dict[str, Any]:
    """Model card: version, classes, threshold, preprocessing, training data."""
    return service.card
