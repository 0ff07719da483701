"""``POST /predict/dicom``: one DICOM file's results as DICOM (SR and SEG), in a ZIP."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from busdx.data.dicom import looks_like_dicom
from busdx.data.imaging import ImageInput
from busdx.serving.deps import Service
from busdx.serving.errors import ApiError
from busdx.serving.schemas import ERRORS, LABEL_HELP

router = APIRouter()

ZIP_ANSWER = {200: {"content": {"application/zip": {}},
                    "description": "SR_<uid>_f<frame>.dcm and, where the model outlines, "
                    "SEG_<uid>_f<frame>.dcm"}}  # fmt: skip


@router.post("/predict/dicom", responses={**ERRORS, **ZIP_ANSWER}, response_class=Response)
async def predict_dicom(
    service: Service,
    file: Annotated[UploadFile, File(description="one DICOM file")],
    frame: Annotated[int, Form(ge=0, description="DICOM frame (0: the first)")] = 0,
    label_out_of_scope: Annotated[bool, Form(description=LABEL_HELP)] = False,
) -> Response:
    """The Structured Report (TID 1500) and, for a model that outlines, the Segmentation of
    one frame of an uploaded DICOM file, as ``busdx predict --dicom-out`` writes them
    (docs/dicom-results.md), in a ZIP download."""
    import pydicom  # here, not at start-up: pydicom and highdicom take a while to import

    from busdx.inference.batch import predict_files

    try:
        from busdx.pacs.dicom_out import dicom_results, model_identity
    except ImportError as exc:
        raise ApiError(501, "dicom_out_unavailable", f"DICOM results need {exc.name}, which "
                       "this server leaves out: pip install 'busdx[pacs]'") from exc  # fmt: skip
    data = await file.read()
    if not looks_like_dicom(data[:132]):
        name = file.filename or "upload"
        raise ApiError(400, "not_dicom", f"{name} is not a DICOM file (no DICM marker): "
                       "/predict/dicom takes DICOM only; use /predict")  # fmt: skip
    await file.seek(0)
    await service.read(file, None, frame)  # the limits and checks of /predict: 4xx on failure
    with tempfile.TemporaryDirectory(prefix="busdx-api-") as folder:
        path = Path(folder) / "upload.dcm"
        path.write_bytes(data)
        (row,) = await service.gate.run(lambda: list(predict_files(
            service.predictor, [ImageInput(path, frame)], progress=False,
            label_out_of_scope=label_out_of_scope)))  # fmt: skip
        source = pydicom.dcmread(path, stop_before_pixels=True)
        results = await service.gate.run(dicom_results, row, source,
                                         model_identity(service.predictor))  # fmt: skip
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, dataset in results.files():
            part = io.BytesIO()
            dataset.save_as(part, enforce_file_format=True)
            archive.writestr(name, part.getvalue())
    headers = {"Content-Disposition": 'attachment; filename="busdx-dicom-results.zip"'}
    return Response(buffer.getvalue(), media_type="application/zip", headers=headers)
