"""Request fields and response bodies of the API, as its OpenAPI schema shows them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from busdx.stats.likelihood import CATEGORY_LABEL

__all__ = [
    "BOX_HELP",
    "ERRORS",
    "LABEL_HELP",
    "PIXEL_HELP",
    "ErrorBody",
    "ExplainResponse",
    "Health",
    "LesionBody",
    "PredictResponse",
    "Prediction",
]

LABEL_HELP = "also label an input flagged out of scope (default: probability and reason only)"
PIXEL_HELP = "pixel size in mm, to measure lesions in mm (a DICOM's own spacing comes first)"
BOX_HELP = (
    "lesion box x,y,w,h in the image's pixels: required by a model trained on boxes "
    "(preprocessing.region: box), refused by a whole-image model"
)


class LesionBody(BaseModel):
    """The lesion outlined by the model's mask head, measured on the image (see
    :mod:`busdx.lesion.descriptors` for each descriptor's rule)."""

    unit: Literal["mm", "px"] = Field(description="mm when the pixel size is known")
    long_axis: float = Field(description="longest diameter")
    short_axis: float = Field(description="longest diameter perpendicular to it")
    width: float = Field(description="horizontal extent")
    height: float = Field(description="vertical extent (depth)")
    shape: Literal["oval", "round", "irregular"]
    orientation: Literal["parallel", "not parallel"] = Field(
        description='"not parallel": taller than wide'
    )
    margin: Literal["circumscribed", "not circumscribed"]
    posterior: Literal["enhancement", "shadowing", "none"] | None = Field(
        description="posterior features; null when the image leaves no room to measure"
    )
    outline: list[list[float]] = Field(description="closed polygon, [x, y] in image pixels")


class Prediction(BaseModel):
    """One image's answer; ``error`` is set (and the rest empty) when it could not be read."""

    filename: str
    probability_malignant: float | None
    label: str | None = Field(
        description="the decision, made by the server at its threshold; null for an input out "
        "of scope (unless label_out_of_scope) or unreadable"
    )
    threshold: float
    out_of_scope: bool | None = Field(description="not a B-mode scan (pixel rules): no label")
    scope_reason: str | None
    error: str | None
    box: str | None = Field(default=None, description="the lesion box used, x,y,w,h")
    likelihood_category: Literal["3", "4a", "4b", "4c", "5"] | None = Field(
        default=None, description=CATEGORY_LABEL + " of the calibrated probability"
    )
    lesion: LesionBody | None = Field(default=None, description="from a model with a mask head")


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
        501: "/explain on a server with only the ONNX model; /predict/dicom without highdicom",
        503: "too many requests waiting",
    }.items()
}
