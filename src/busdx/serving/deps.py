"""The model the routes share: loaded once when the app is created, injected per request."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile
from PIL import Image

from busdx import __version__
from busdx.data.boxes import parse_box
from busdx.data.imaging import Box, decode_image
from busdx.data.preprocess import region_of
from busdx.errors import BusdxError
from busdx.evaluation.local_check import describe_threshold, expectation
from busdx.inference.predictor import Predictor, load_model
from busdx.layout import MODEL_FILE
from busdx.lesion.descriptors import Lesion
from busdx.lesion.outline import lesion_from_mask, region_view
from busdx.runs import load_run
from busdx.serving.guard import Gate
from busdx.serving.settings import ServeSettings

__all__ = ["ModelService", "Service", "Upload", "lesion_body", "load_service"]


@dataclass(frozen=True)
class Upload:
    """One uploaded image, decoded: its name, the image, the region the model looks at and
    the lesion box that made it (ROI models)."""

    name: str
    image: Image.Image
    region: Image.Image
    box: Box | None


def lesion_body(lesion: Lesion) -> dict[str, Any]:
    """The API's ``lesion`` field (see :class:`busdx.serving.schemas.LesionBody`)."""
    fields = ("unit", "long_axis", "short_axis", "width", "height", "shape", "orientation",
              "margin", "posterior")  # fmt: skip
    body = {name: getattr(lesion, name) for name in fields}
    return body | {"outline": [list(point) for point in lesion.outline]}


@dataclass
class ModelService:
    """The served model (``predictor``), the model file Grad-CAM reads (``model_file``: None on
    an ONNX-only deployment), the model card and the gate that limits concurrent model calls."""

    settings: ServeSettings
    predictor: Predictor
    model_file: Path | None
    card: dict[str, Any]
    gate: Gate

    @functools.cached_property
    def explainer(self) -> Predictor | None:
        """The torch model for Grad-CAM, loaded at the first ``/explain`` (torch takes seconds
        to import; the server starts without it): the served model on the torch backend; None
        without ``model.pt`` or without torch installed."""
        if self.predictor.backend == "torch":
            return self.predictor
        if self.model_file is None or importlib.util.find_spec("torch") is None:
            return None
        return load_model(self.model_file, threads=_threads(self.settings))

    async def read(self, upload: UploadFile, box: str | None, frame: int) -> Upload:
        """The upload decoded (its DICOM ``frame``), with the region the model looks at (the
        lesion ``box`` of an ROI model); 4xx errors as exceptions."""
        name = upload.filename or "upload"
        data = await upload.read()
        image = decode_image(data, name, frame=frame, max_pixels=self.settings.max_pixels)
        parsed = parse_box(box) if box else None
        region = region_of(image, parsed, self.predictor.preprocessing, name=name)
        return Upload(name, image, region, parsed)

    def decide(
        self, uploads: list[Upload], *, label_out_of_scope: bool = False,
        pixel_size: float | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The server's decisions: probability, label at its threshold (none for an input
        out of scope unless ``label_out_of_scope``), scope flag, likelihood category and, from
        a model with a mask head, the lesion (in mm with ``pixel_size`` or a DICOM's spacing)."""
        predictor, prep = self.predictor, self.predictor.preprocessing
        decisions = predictor.decide_images(
            [u.image for u in uploads], regions=[u.region for u in uploads],
            label_out_of_scope=label_out_of_scope,
        )  # fmt: skip
        spacing = None if pixel_size is None else (pixel_size, pixel_size)
        answers = []
        for upload, decision in zip(uploads, decisions, strict=True):
            lesion = None
            if decision.mask is not None:
                view = region_view(upload.image, upload.box, prep, spacing)
                lesion = lesion_from_mask(decision.mask, view, prep)
            answers.append({
                "probability_malignant": round(decision.probability, 6),
                "label": decision.label, "out_of_scope": decision.out_of_scope,
                "scope_reason": decision.scope_reason,
                "likelihood_category": decision.likelihood_category,
                "lesion": None if lesion is None else lesion_body(lesion),
            })  # fmt: skip
        return answers


def load_service(run: str | Path, settings: ServeSettings) -> ModelService:
    """Load the model of ``run`` (a run directory or model file) for serving."""
    run_dir = Path(run)
    predictor = load_model(run_dir, backend=settings.backend, threads=_threads(settings))
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    model_file = folder / MODEL_FILE if (folder / MODEL_FILE).is_file() else None
    card = _model_card(predictor, folder)
    gate = Gate(settings.workers, settings.queue_size)
    return ModelService(settings, predictor, model_file, card, gate)


def _threads(settings: ServeSettings) -> int:
    """CPU threads per model call: the cores shared by the workers, never oversubscribed."""
    return max(1, (os.cpu_count() or 1) // settings.workers)


def _model_card(loaded: Predictor, run_dir: Path) -> dict[str, Any]:
    info = loaded.info
    card: dict[str, Any] = {
        "busdx_version": info.provenance.busdx_version,
        "server_version": __version__,
        "backend": loaded.backend,
        "model": info.network,
        "classes": loaded.class_names,
        "positive_class": info.positive_class,
        "threshold": loaded.threshold,
        "threshold_policy": info.calibration.threshold_policy if info.calibration else None,
        "threshold_basis": describe_threshold(info.calibration, expectation(run_dir)),
        "temperature": loaded.temperature,
        "preprocessing": loaded.preprocessing.to_dict(),
        "weights": info.provenance.weights,
        "intended_use": "research use only; not a medical device",
    }
    try:
        _, run_info = load_run(run_dir)
        card["training_data"] = {"counts": run_info["counts"], "layout": run_info["layout"]}
    except (BusdxError, OSError, KeyError):  # a bare model file has no run directory around it
        card["training_data"] = None
    return card


def _service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(_service)]  # a route's parameter: the shared model
