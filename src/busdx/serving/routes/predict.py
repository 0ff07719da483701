"""``POST /predict``: probability and label of each uploaded image."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from busdx.errors import BoxError, ImageDecodeError
from busdx.serving.deps import Service
from busdx.serving.errors import ApiError
from busdx.serving.schemas import BOX_HELP, ERRORS, LABEL_HELP, PIXEL_HELP, PredictResponse

router = APIRouter()


@router.post("/predict", responses=ERRORS)
async def predict(
    service: Service,
    files: Annotated[list[UploadFile], File(min_length=1, description="one or several images")],
    box: Annotated[list[str] | None, Form(description=BOX_HELP)] = None,
    frame: Annotated[int, Form(ge=0, description="DICOM frame (0: the first)")] = 0,
    label_out_of_scope: Annotated[bool, Form(description=LABEL_HELP)] = False,
    pixel_size: Annotated[float | None, Form(gt=0, le=10, description=PIXEL_HELP)] = None,
) -> PredictResponse:
    """Probability of malignancy for each uploaded image (multipart field ``files``), with
    its lesion box (field ``box``, ``x,y,w,h``, one per file in order) for a model trained
    on boxes (``/model``: ``preprocessing.region`` is ``box``).

    An unreadable file (or a missing or invalid box) gets an error in its own row; if no
    file is readable the answer is the first file's 4xx error.
    """
    started = time.perf_counter()
    limit = service.settings.max_files
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"at most {limit} files a request")
    boxes = list(box or [])
    if boxes and len(boxes) != len(files):
        raise ApiError(422, "bad_box", f"{len(boxes)} box(es) for {len(files)} file(s): "
                       "give one box per file, in the files' order")  # fmt: skip
    rows: list[dict[str, Any]] = []
    readable, first_error = [], None
    for upload, given in zip(files, boxes or [None] * len(files), strict=True):
        row = {"filename": upload.filename or "upload", "threshold": service.predictor.threshold,
               "probability_malignant": None, "label": None, "out_of_scope": None,
               "scope_reason": None, "error": None, "box": given}  # fmt: skip
        try:
            readable.append((row, await service.read(upload, given, frame)))
        except (ImageDecodeError, BoxError) as exc:
            first_error = first_error or exc
            row["error"] = str(exc)
        rows.append(row)
    if not readable:
        raise first_error
    results = await service.gate.run(
        service.decide, [upload for _, upload in readable],
        label_out_of_scope=label_out_of_scope, pixel_size=pixel_size,
    )  # fmt: skip
    for (row, _), result in zip(readable, results, strict=True):
        row.update(result)
    elapsed = (time.perf_counter() - started) * 1000
    return PredictResponse(
        predictions=rows, timing_ms=round(elapsed, 1), backend=service.predictor.backend
    )
