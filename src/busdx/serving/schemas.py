"""Request fields and response bodies of the API, as its OpenAPI schema shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "BOX_HELP",
    "ERRORS",
    "ErrorBody",
    "ExplainResponse",
    "Health",
    "PredictResponse",
    "Prediction",
]

BOX_HELP = (
    "lesion box x,y,w,h in the image's pixels: required by a model trained on boxes "
    "(preprocessing.region: box), refused by a whole-image model"
)


class Prediction(BaseModel):
    """One image's answer; ``error`` is set (and the rest empty) when it could not be read."""

    filename: str
    probability_malignant: float | None
    label: str | None = Field(description="the decision, made by the server at its threshold")
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

    error: str = Field(description="a stable code, e.g. bad_image, too_large, unauthorized")
    detail: str = Field(description="what went wrong and what to do, for a person")


# every error a POST route can answer, with its body, for the OpenAPI schema
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "an unreadable or empty image, or a malformed upload",
        401: "missing or wrong API key",
        413: "upload or image too large",
        415: "not multipart/form-data",
        422: "a missing field or a bad parameter",
        501: "/explain on a server with only the ONNX model",
        503: "too many requests waiting",
    }.items()
}
