"""``POST /explain``: the Grad-CAM overlay of one image, with the server's decision."""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from busdx.explain import explain_image
from busdx.layout import MODEL_FILE
from busdx.serving.deps import Service
from busdx.serving.errors import ApiError
from busdx.serving.schemas import BOX_HELP, ERRORS, ExplainResponse

router = APIRouter()

PNG_ANSWER = {200: {"content": {"image/png": {}}, "model": ExplainResponse}}


@router.post("/explain", responses={**ERRORS, **PNG_ANSWER})
async def explain(
    service: Service,
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
    if service.explainer is None:
        raise ApiError(
            501, "explain_unavailable",
            f"Grad-CAM needs the PyTorch model ({MODEL_FILE}); this server has only ONNX",
        )  # fmt: skip
    name, image, region = await service.read(file, box, frame)
    (decision,) = await service.gate.run(service.decide, [image], [region])
    explanation = await service.gate.run(explain_image, service.explainer, region)
    buffer = io.BytesIO()
    explanation.overlay.save(buffer, format="PNG")
    backend = service.predictor.backend
    if format == "png":
        headers = {"X-Probability": str(decision["probability_malignant"]),
                   "X-Label": decision["label"], "X-Backend": backend}  # fmt: skip
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)
    answer = ExplainResponse(
        filename=name, threshold=service.predictor.threshold, error=None, box=box, **decision,
        overlay_png_base64=base64.b64encode(buffer.getvalue()).decode("ascii"),
        timing_ms=round((time.perf_counter() - started) * 1000, 1),
        backend=backend, overlay_backend="torch",
    )  # fmt: skip
    return JSONResponse(answer.model_dump())
