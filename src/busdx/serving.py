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
import os
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from busdx import __version__
from busdx.boxes import parse_box
from busdx.errors import BoxError, ConfigError, ImageDecodeError, ImageTooLargeError
from busdx.explain import explain_image
from busdx.imaging import decode_image
from busdx.predictor import Predictor, load_model
from busdx.runs import load_run
from busdx.training import MODEL_FILE
from busdx.transforms import region_of

__all__ = [
    "ErrorBody",
    "ExplainResponse",
    "Health",
    "PredictResponse",
    "Prediction",
    "ServeSettings",
    "check_bind",
    "create_app",
]

logger = logging.getLogger(__name__)
BOX_HELP = (
    "lesion box x,y,w,h in the image's pixels: required by a model trained on boxes "
    "(preprocessing.region: box), refused by a whole-image model"
)

API_KEY_HEADER = "X-API-Key"


class ServeSettings(BaseSettings):
    """Limits and security of the service; each also read from ``BUSDX_<NAME>`` (for example
    ``BUSDX_API_KEY``, ``BUSDX_MAX_UPLOAD_MB``), command-line options winning over both."""

    model_config = SettingsConfigDict(env_prefix="BUSDX_", frozen=True, extra="forbid")

    max_upload_mb: float = Field(20.0, gt=0, description="whole request body")
    max_pixels: int = Field(50_000_000, gt=0, description="per image: refuse decompression bombs")
    max_files: int = Field(32, ge=1, description="per /predict request")
    workers: int = Field(1, ge=1, description="model calls at a time")
    queue_size: int = Field(64, ge=0, description="requests waiting for a worker; more get 503")
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    backend: Literal["auto", "torch", "onnx"] = "auto"

    @classmethod
    def from_options(cls, **options: Any) -> ServeSettings:
        """Settings from the options given (``None`` = not given: environment, then default);
        a bad value is a :class:`ConfigError` naming it."""
        try:
            return cls(**{name: value for name, value in options.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError(f"serve setting {_first_problem(exc)}") from None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Prediction(BaseModel):
    """One image's answer; ``error`` is set (and the rest empty) when it could not be read."""

    filename: str
    probability_malignant: float | None
    label: str | None
    threshold: float
    out_of_scope: bool | None = Field(description="far from the training images, or not a scan")
    scope_reason: str | None
    error: str | None
    box: str | None = Field(default=None, description="the lesion box used, x,y,w,h")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    timing_ms: float
    backend: str = Field(description="the model that computed the probabilities")


class ExplainResponse(Prediction):
    overlay_png_base64: str
    timing_ms: float
    backend: str = Field(description="the model that computed the probability")
    overlay_backend: Literal["torch"] = Field(description="Grad-CAM needs the torch model")


class Health(BaseModel):
    status: Literal["ok"]
    backend: str
    api_key_required: bool


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "an unreadable image or a malformed upload",
        401: "missing or wrong API key",
        413: "upload or image too large",
        415: "not multipart/form-data",
        422: "a missing field or a bad parameter",
        501: "/explain on a server with only the ONNX model",
        503: "too many requests waiting",
    }.items()
}


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


class ApiError(Exception):
    """An answer other than 200, with its status and error code."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _json_error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class RequestGuard:
    """ASGI middleware for every POST, before the application parses it: the API key, then
    ``multipart/form-data``, then the body size (declared or, for chunked uploads, counted while
    reading), answering 401 / 415 / 413 without reading more than ``settings.max_upload_bytes``."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        refusal = self._refusal({k.decode("latin-1"): v.decode("latin-1")
                                 for k, v in scope["headers"]})  # fmt: skip
        if refusal is not None:
            return await refusal(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.settings.max_upload_bytes:
                return await self._too_large()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return _json_error(413, "too_large", f"upload exceeds {self.settings.max_upload_mb:g} MB")

    def _refusal(self, headers: dict[str, str]) -> JSONResponse | None:
        key = self.settings.api_key
        if key and not hmac.compare_digest(headers.get(API_KEY_HEADER.lower(), ""), key):
            return _json_error(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header")
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return _json_error(
                415, "unsupported_media_type", "send multipart/form-data with the image file(s)"
            )
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.settings.max_upload_bytes:
            return self._too_large()
        return None


class _Gate:
    """At most ``workers`` model calls at once and ``queue_size`` waiting; else 503."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.limiter = anyio.CapacityLimiter(workers)
        self.queue_size, self.waiting = queue_size, 0

    async def run(self, function: Any, *args: Any) -> Any:
        if self.waiting >= self.queue_size:
            raise ApiError(503, "busy", "too many requests are waiting; retry shortly")
        self.waiting += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)
        finally:
            self.waiting -= 1


def _model_card(loaded: Predictor, run_dir: Path, backend: str) -> dict[str, Any]:
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


def _add_error_handlers(app: FastAPI) -> None:
    """Map exceptions to ``{error, detail}`` answers by their class."""
    handlers: dict[type[Exception], Any] = {
        ApiError: lambda exc: (exc.status, exc.error, exc.detail),
        ImageTooLargeError: lambda exc: (413, "image_too_large", str(exc)),
        ImageDecodeError: lambda exc: (400, "bad_image", str(exc)),
        BoxError: lambda exc: (422, "bad_box", str(exc)),
        HTTPException: lambda exc: (exc.status_code, "http_error", str(exc.detail)),
        RequestValidationError: lambda exc: (422, "invalid_request", _first_problem(exc)),
    }
    for kind, answer in handlers.items():

        async def handler(_: Request, exc: Exception, answer: Any = answer) -> JSONResponse:
            return _json_error(*answer(exc))

        app.add_exception_handler(kind, handler)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")  # the traceback stays in the server log
        return _json_error(500, "internal_error", "the server could not process this request")


def _first_problem(exc: ValidationError | RequestValidationError) -> str:
    """``where: what`` of a pydantic validation error's first problem."""
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem.get("loc", ()))
    return f"{where}: {problem.get('msg', 'invalid')}"


def create_app(run: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving the model of ``run`` (a run directory or model file)."""
    settings = settings or ServeSettings()
    run_dir = Path(run)
    threads = max(1, (os.cpu_count() or 1) // settings.workers)  # workers never oversubscribe
    predictor = load_model(run_dir, backend=settings.backend, threads=threads)
    if predictor.backend == "torch":
        explainer: Predictor | None = predictor
    else:  # Grad-CAM needs the torch model's gradients; an ONNX-only deployment has no /explain
        has_torch = run_dir.is_dir() and (run_dir / MODEL_FILE).is_file()
        explainer = load_model(run_dir, threads=threads) if has_torch else None
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
    app.add_middleware(RequestGuard, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"],
        )  # fmt: skip
    _add_error_handlers(app)

    async def _read(upload: UploadFile, box: str | None, frame: int) -> tuple[str, Any, Any]:
        """The upload's name, decoded image (its DICOM ``frame``) and the region the model
        looks at (the lesion ``box`` of an ROI model); 4xx errors as exceptions."""
        name = upload.filename or "upload"
        data = await upload.read()
        image = decode_image(data, name, frame=frame, max_pixels=settings.max_pixels)
        parsed = parse_box(box) if box else None
        return name, image, region_of(image, parsed, predictor.preprocessing, name=name)

    def _predict(images: list[Any], regions: list[Any]) -> list[dict[str, Any]]:
        return [
            {"probability_malignant": round(decision.probability, 6), "label": decision.label,
             "out_of_scope": decision.out_of_scope, "scope_reason": decision.scope_reason}
            for decision in predictor.decide_images(images, regions=regions)
        ]  # fmt: skip

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Health:
        """Liveness: the model is loaded and the server answers."""
        return Health(status="ok", backend=predictor.backend,
                      api_key_required=bool(settings.api_key))  # fmt: skip

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """Model card: version, classes, threshold, preprocessing, training data."""
        return card

    @app.post("/predict", responses=ERRORS)
    async def predict(
        files: Annotated[list[UploadFile], File(description="one or several images")],
        box: Annotated[list[str] | None, Form(description=BOX_HELP)] = None,
        frame: Annotated[int, Form(ge=0, description="DICOM frame (0: the first)")] = 0,
    ) -> PredictResponse:
        """Probability of malignancy for each uploaded image (multipart field ``files``), with
        its lesion box (field ``box``, ``x,y,w,h``, one per file in order) for a model trained
        on boxes (``/model``: ``preprocessing.region`` is ``box``).

        An unreadable file (or a missing or invalid box) gets an error in its own row; if no
        file is readable the answer is the first file's 4xx error.
        """
        started = time.perf_counter()
        if len(files) > settings.max_files:
            raise ApiError(413, "too_many_files", f"at most {settings.max_files} files a request")
        boxes = list(box or [])
        if boxes and len(boxes) != len(files):
            raise ApiError(422, "bad_box", f"{len(boxes)} box(es) for {len(files)} file(s): "
                           "give one box per file, in the files' order")  # fmt: skip
        rows: list[dict[str, Any]] = []
        readable, first_error = [], None
        for upload, given in zip(files, boxes or [None] * len(files), strict=True):
            row = {"filename": upload.filename or "upload", "threshold": predictor.threshold,
                   "probability_malignant": None, "label": None, "out_of_scope": None,
                   "scope_reason": None, "error": None, "box": given}  # fmt: skip
            try:
                readable.append((row, *(await _read(upload, given, frame))[1:]))
            except (ImageDecodeError, BoxError) as exc:
                first_error = first_error or exc
                row["error"] = str(exc)
            rows.append(row)
        if not readable:
            raise first_error
        images, regions = [item[1] for item in readable], [item[2] for item in readable]
        results = await gate.run(_predict, images, regions)
        for (row, *_), result in zip(readable, results, strict=True):
            row.update(result)
        elapsed = (time.perf_counter() - started) * 1000
        return PredictResponse(
            predictions=rows, timing_ms=round(elapsed, 1), backend=predictor.backend
        )

    @app.post(
        "/explain",
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "model": ExplainResponse}},
    )
    async def explain(
        file: Annotated[UploadFile, File(description="one image")],
        format: Annotated[Literal["png", "json"], Query()] = "png",
        box: Annotated[str | None, Form(description=BOX_HELP)] = None,
        frame: Annotated[int, Form(ge=0, description="DICOM frame (0: the first)")] = 0,
    ) -> Response:
        """Grad-CAM overlay at the image's original size (field ``file``).

        ``format=png`` (default) returns the PNG, with the decision in ``X-Probability`` and
        ``X-Label`` headers; ``format=json`` returns the decision and a base64 PNG. The decision
        comes from the served backend, as in ``/predict``; the overlay from the torch model.
        """
        started = time.perf_counter()
        if explainer is None:
            raise ApiError(
                501, "explain_unavailable",
                f"Grad-CAM needs the PyTorch model ({MODEL_FILE}); this server has only ONNX",
            )  # fmt: skip
        name, image, region = await _read(file, box, frame)
        (decision,) = await gate.run(_predict, [image], [region])
        explanation = await gate.run(explain_image, explainer, region)
        buffer = io.BytesIO()
        explanation.overlay.save(buffer, format="PNG")
        if format == "png":
            headers = {"X-Probability": str(decision["probability_malignant"]),
                       "X-Label": decision["label"], "X-Backend": predictor.backend}  # fmt: skip
            return Response(buffer.getvalue(), media_type="image/png", headers=headers)
        answer = ExplainResponse(
            filename=name, threshold=predictor.threshold, error=None, box=box, **decision,
            overlay_png_base64=base64.b64encode(buffer.getvalue()).decode("ascii"),
            timing_ms=round((time.perf_counter() - started) * 1000, 1),
            backend=predictor.backend, overlay_backend="torch",
        )  # fmt: skip
        return JSONResponse(answer.model_dump())

    app.state.gate, app.state.predictor = gate, predictor
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
