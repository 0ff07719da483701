"""Web app and REST API: ``busdx serve --run RUNDIR``.

Built in layers, as the FastAPI full-stack template is: :mod:`~busdx.serving.settings` (limits
and security, from options and ``BUSDX_*`` variables), :mod:`~busdx.serving.deps` (the model,
loaded once at start-up and injected into each route), :mod:`~busdx.serving.schemas` (request
and response bodies), :mod:`~busdx.serving.routes` (one module per resource),
:mod:`~busdx.serving.errors` (exceptions to ``{error, detail}`` answers) and
:mod:`~busdx.serving.guard` (key, media type and size checked before a body is parsed);
:func:`create_app` only assembles them.

* ``GET /`` a single page (no CDN): drop or choose images, see the probability against the
  threshold, the server's label and, on request, the Grad-CAM overlay;
* ``GET /health``, ``GET /model`` (model card facts), ``POST /predict`` (multipart field
  ``files``, one or several images), ``POST /explain`` (field ``file``; a PNG overlay);
* OpenAPI docs at ``/docs`` (served from the package, also offline).

Every user mistake is answered with a 4xx JSON body ``{"error": ..., "detail": ...}``; no
traceback ever leaves the server. Model work runs in worker threads, at most ``workers`` at a
time with at most ``queue_size`` requests waiting; beyond that the answer is 503. Off the
loopback interface an API key (header ``X-API-Key``) is required unless explicitly disabled.
"""

from busdx.serving.app import create_app, serve
from busdx.serving.schemas import ErrorBody, ExplainResponse, Health, Prediction, PredictResponse
from busdx.serving.settings import ServeSettings, check_bind

__all__ = [
    "ErrorBody",
    "ExplainResponse",
    "Health",
    "PredictResponse",
    "Prediction",
    "ServeSettings",
    "check_bind",
    "create_app",
    "serve",
]
