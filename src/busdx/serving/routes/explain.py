"""``POST /explain``: the Grad-CAM overlay of one image, with the server's decision."""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from busdx.layout import MODEL_FILE
from busdx.serving.deps import Service
from busdx.serving.errors import ApiError
from busdx.serving.schemas import BOX_HELP, ERRORS, LABEL_HELP, PIXEL_HELP, ExplainResponse

router = APIRouter()

PNG_ANSWER = {200: {"content": {"image/png": {}}, "model": ExplainResponse}}


@router.post("/explain", responses={**ERRORS, **PNG_ANSWER})
async def explain(
    service: Service,
    file: Annotated[UploadFile, File(description="one image")],
    format: Annotated[Literal["png", "json"], Query()] = "png",
    box: Annotated[str | None, Form(description=BOX_HELP)] = None,
    frame: Annotated[int, Form(ge=0, description="DICOM frame (0: the first)")] = 0,
    label_out_of_scope: Annotated[bool, Form(description=LABEL_HELP)] = False,
    pixel_size: Annotated[float | None, Form(gt=0, le=10, description=PIXEL_HELP)] = None,
) -> Response:
    """Grad-CAM overlay at the image's original size (field ``file``).

    ``format=png`` (default) returns the PNG, with the decision in ``X-Probability`` and
    ``X-Label`` headers; ``format=json`` returns the decision and a base64 PNG. The decision
    comes from the served backend, as in ``/predict``; the overlay from the torch model.
    """
    started = time.perf_counter()
    explainer = await service.gate.run(lambda: service.explainer)  # loaded at the first call
    if explainer is None:
        raise ApiError(
            501, "explain_unavailable",
            f"Grad-CAM needs the PyTorch model ({MODEL_FILE}) and torch (pip install "
            "'busdx[train]'); this server has only ONNX",
        )  # fmt: skip
    upload = await service.read(file, box, frame)
    (decision,) = await service.gate.run(
        service.decide, [upload], label_out_of_scope=label_out_of_scope, pixel_size=pixel_size
    )
    from busdx.networks.gradcam import explain_image  # torch: loaded with the explainer, not before

    explanation = await service.gate.run(explain_image, explainer, upload.region)
    buffer = io.BytesIO()
    explanation.overlay.save(buffer, format="PNG")
    backend = service.predictor.backend
    if format == "png":
        headers = {"X-Probability": str(decision["probability_malignant"]),
                   "X-Out-Of-Scope": str(decision["out_of_scope"]).lower(),
                   "X-Backend": backend}  # fmt: skip
        if decision["label"] is not None:  # none for an input out of scope
            headers["X-Label"] = decision["label"]
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)
    answer = ExplainResponse(
        filename=upload.name, threshold=service.predictor.threshold, error=None, box=box,
        **decision,
        overlay_png_base64=base64.b64encode(buffer.getvalue()).decode("ascii"),
        timing_ms=round((time.perf_counter() - started) * 1000, 1),
        backend=backend, overlay_backend="torch",
    )  # fmt: skip
    return JSONResponse(answer.model_dump())
