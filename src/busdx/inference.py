"""Load a trained model and predict the probability of malignancy for image files.

Two backends run the same network: ``torch`` reads ``model.pt`` with
``torch.load(..., weights_only=True)`` (an untrusted file cannot run code), ``onnx`` runs the
exported ``model.int8.onnx`` (or ``model.onnx``) with ONNX Runtime, several times faster on a
CPU (see ``busdx export``). Both carry the same metadata: preprocessing, class names,
threshold, temperature. Prediction streams: files are read batch by batch, and a file that
cannot be decoded yields an error row while the rest goes on.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from busdx.config import ModelConfig
from busdx.errors import CheckpointError, ConfigError, DataError, ImageDecodeError
from busdx.fileio import atomic_path, sha256_file
from busdx.imaging import is_image_file, load_image
from busdx.models import BinaryClassifier, Ensemble, create_model
from busdx.scope import SCOPE_KEY, image_checks, scope_distances
from busdx.training import MODEL_FILE, resolve_device
from busdx.transforms import Preprocessing, build_eval_transform

__all__ = [
    "BACKENDS",
    "EXPORT_STAMP",
    "INT8_FILE",
    "ONNX_FILE",
    "LoadedModel",
    "Prediction",
    "expand_paths",
    "file_logits",
    "file_predictions",
    "iter_image_paths",
    "load_model",
    "predict_files",
    "write_predictions",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXPORT_STAMP = "exported_from"  # ONNX metadata: {"file", "sha256"} of the model.pt exported
ONNX_METADATA_KEY = "busdx"


@dataclass
class LoadedModel:
    """A trained classifier ready to predict, with everything needed to use it.

    ``model`` is the PyTorch network (backend ``torch``; also used for explanations),
    ``session`` an ONNX Runtime session (backend ``onnx``).
    """

    metadata: dict[str, Any]
    preprocessing: Preprocessing
    path: Path
    model: BinaryClassifier | Ensemble | None = None
    session: Any = None  # onnxruntime.InferenceSession
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def backend(self) -> str:
        return "onnx" if self.session is not None else "torch"

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def temperature(self) -> float:
        """Temperature-scaling factor fitted on validation data (1.0: uncalibrated)."""
        return float(self.metadata.get("temperature", 1.0))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probability of the positive class: ``sigmoid(logit / temperature)``."""
        return torch.sigmoid(logits / self.temperature)

    def label(self, probability: float, threshold: float | None = None) -> str:
        """Class name decided at ``threshold`` (default: the model's own)."""
        negative, positive = self.class_names
        return (
            positive
            if probability >= (self.threshold if threshold is None else threshold)
            else negative
        )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """Raw log-odds of the positive class for a batch of preprocessed images, and each
        image's out-of-scope distance (see :mod:`busdx.scope`; None without a fitted guard or
        on the ONNX backend). The backbone runs once for both."""
        if self.session is not None:
            (logits,) = self.session.run(None, {"images": images.numpy()})
            return torch.from_numpy(logits), None
        images = images.to(self.device)
        scope = self.metadata.get(SCOPE_KEY)
        if scope is None:
            return self.model(images).cpu(), None
        first, *others = getattr(self.model, "members", [self.model])
        maps, tapped = first.run_backbone(first.stem(images), first.stem_layers)
        logits = torch.stack([first.classify(maps, tapped), *(m(images) for m in others)])
        distances = scope_distances(scope, maps.float().mean(dim=(2, 3)))
        return logits.mean(dim=0).cpu(), distances

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw log-odds of the positive class for a batch of preprocessed images."""
        return self.predict(images)[0]

    def scope_reason(self, checks: list[str], distance: float | None) -> str | None:
        """Why an input is out of scope (None: it is not, or there is no way to tell).

        ``checks`` are :func:`busdx.scope.image_checks` of the image; ``distance`` its feature
        distance, compared with the guard's threshold when the model has one.
        """
        scope = self.metadata.get(SCOPE_KEY)
        reasons = list(checks)
        if distance is not None and scope is not None and distance > scope["threshold"]:
            reasons.append(
                f"unlike the training images (distance {distance:.1f} > {scope['threshold']:.1f})"
            )
        return "; ".join(reasons) or None

    def out_of_scope(self, checks: list[str], distance: float | None) -> bool | None:
        """Whether an input is out of scope; None when the model has no guard and the image
        passes the pixel checks (nothing is known either way)."""
        if self.scope_reason(checks, distance):
            return True
        return None if distance is None or SCOPE_KEY not in self.metadata else False


def load_model(path: str | Path, *, device: str = "auto", backend: str = "torch") -> LoadedModel:
    """Load a trained model safely: a run directory, ``model.pt`` or an ``.onnx`` file.

    With ``backend="onnx"`` a run directory gives its int8 model when there is one, else its
    fp32 ONNX model.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" or path.suffix == ".onnx":
        return _load_onnx(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; train a model first (busdx train)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a loadable busdx model file ({type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != "busdx-model":
        raise CheckpointError(f"{path} is not a busdx model file")
    prep = Preprocessing.from_dict(payload["preprocessing"])
    config = ModelConfig(**payload["model"])
    members = [
        create_model(config, image_size=prep.image_size, load_weights=False)[0]
        for _ in range(int(payload.get("ensemble_size", 1)))
    ]
    model = Ensemble(members) if "ensemble_size" in payload else members[0]
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model it describes") from exc
    target = resolve_device(device)
    model.to(target).eval()
    metadata = {k: v for k, v in payload.items() if k not in {"state_dict", "optimizer"}}
    return LoadedModel(metadata, prep, path, model=model, device=target)


def _load_onnx(path: Path) -> LoadedModel:
    import onnxruntime

    if path.is_dir():
        found = [path / name for name in (INT8_FILE, ONNX_FILE) if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"no {ONNX_FILE} in {path}; export one first: busdx export --run {path} --int8"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"no ONNX model at {path}; export one first (busdx export)")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not an ONNX model exported by busdx ({type(exc).__name__})"
        ) from exc
    _check_stamp(path, metadata)
    prep = Preprocessing.from_dict(metadata["preprocessing"])
    return LoadedModel(metadata, prep, path, session=session)


def _check_stamp(path: Path, metadata: dict[str, Any]) -> None:
    """Refuse an ONNX file that was not exported from the ``model.pt`` beside it: after a
    resume, a recalibration or a copy from another run it would answer for another model. An
    ONNX file alone (a deployment without ``model.pt``) has nothing to disagree with."""
    source = path.parent / MODEL_FILE
    if not source.is_file():
        return
    stamp = metadata.get(EXPORT_STAMP) or {}
    if stamp.get("sha256") != sha256_file(source):
        raise CheckpointError(
            f"{path} was not exported from the {MODEL_FILE} beside it (changed since by a "
            f"resume, a recalibration or a copy); export again: busdx export --run {path.parent}"
            + (" --int8" if path.name == INT8_FILE else "")
        )


def iter_image_paths(paths: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given plus image files found under given folders (recursively, sorted).

    Folders are walked lazily, one directory listing at a time, so a folder of any size
    streams in constant memory.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, subfolders, names in os.walk(path):
                subfolders.sort()
                for name in sorted(names):
                    if is_image_file(Path(name)):
                        yield Path(folder) / name
        elif path.exists():
            yield path
        else:
            raise DataError(f"{path} does not exist")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """:func:`iter_image_paths` as a list (an error for a missing path comes first)."""
    return list(iter_image_paths(paths))


PREDICTION_FIELDS = [
    "path",
    "probability_malignant",
    "label",
    "threshold",
    "out_of_scope",
    "scope_reason",
    "error",
]


@dataclass
class Prediction:
    """One output row: a probability and label, or the reason there is none."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    logit: float | None = None  # before temperature scaling
    out_of_scope: bool | None = None  # unlike the training images (None: no guard)
    scope_reason: str | None = None
    scope_distance: float | None = None
    checks: list[str] = field(default_factory=list)  # busdx.scope.image_checks of the image

    def to_dict(self) -> dict[str, Any]:
        """The row as written by ``busdx predict`` (keys: ``PREDICTION_FIELDS``)."""
        prob = None if self.probability is None else round(self.probability, 6)
        return {
            "path": self.path,
            "probability_malignant": prob,
            "label": self.label,
            "threshold": self.threshold,
            "out_of_scope": self.out_of_scope,
            "scope_reason": self.scope_reason,
            "error": self.error,
        }


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_files(
    loaded: LoadedModel,
    files: Iterable[Path],
    *,
    batch_size: int = 16,
    progress: bool = True,
    threshold: float | None = None,
    total: int | None = None,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per file, in order, batch by batch.

    ``files`` may be any iterable (e.g. :func:`iter_image_paths`); only one batch of images is
    held in memory. ``total`` sizes the progress bar when ``files`` has no length.
    """
    threshold = loaded.threshold if threshold is None else threshold
    transform = build_eval_transform(loaded.preprocessing)
    total = len(files) if total is None and isinstance(files, Sized) else total
    bar = tqdm(total=total, unit="img", desc="predict", disable=not progress, leave=False)
    for batch in _batches(files, batch_size):
        tensors, rows = [], []
        for path in batch:
            try:
                image = load_image(path)
                tensors.append(transform(image))
                rows.append(
                    Prediction(str(path), None, None, threshold, checks=image_checks(image))
                )
            except ImageDecodeError as exc:
                logger.warning("%s", exc)
                rows.append(Prediction(str(path), None, None, threshold, error=str(exc)))
        logits, distances = loaded.predict(torch.stack(tensors)) if tensors else (None, None)
        logits = torch.zeros(0) if logits is None else logits
        distances = [None] * len(logits) if distances is None else distances.tolist()
        probabilities = loaded.probabilities(logits)
        scores = iter(zip(logits.tolist(), probabilities.tolist(), distances, strict=True))
        for row in rows:
            if row.error is None:
                row.logit, row.probability, row.scope_distance = next(scores)
                row.label = loaded.label(row.probability, threshold)
                row.out_of_scope = loaded.out_of_scope(row.checks, row.scope_distance)
                row.scope_reason = loaded.scope_reason(row.checks, row.scope_distance)
            bar.update()
            yield row
    bar.close()


def file_predictions(
    loaded: LoadedModel, files: Sequence[Path], *, progress: bool = True
) -> list[Prediction]:
    """One prediction per file, in order; all files must be readable (labelled data)."""
    rows = list(predict_files(loaded, files, progress=progress))
    failed = [row.error for row in rows if row.error]
    if failed:
        raise DataError(f"{len(failed)} evaluation image(s) could not be read, e.g. {failed[0]}")
    return rows


def file_logits(loaded: LoadedModel, files: Sequence[Path], *, progress: bool = True) -> np.ndarray:
    """Raw logit (before temperature scaling) of each file, in order; all must be readable."""
    return np.array([row.logit for row in file_predictions(loaded, files, progress=progress)])


def write_predictions(rows: Iterable[Prediction], out: str | Path | None) -> tuple[int, int]:
    """Stream rows to ``out`` (.csv or .json, written atomically) or CSV on stdout.

    Returns (rows written, rows with an error). Memory stays constant in the number of rows.
    """
    suffix = Path(out).suffix.lower() if out else ".csv"
    with contextlib.ExitStack() as stack:
        if out:
            tmp = stack.enter_context(atomic_path(out))
            handle = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        else:
            handle = sys.stdout
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_FIELDS, lineterminator="\n")
        handle.write("[" if suffix == ".json" else "")
        count = failed = 0
        for row in rows:
            record = row.to_dict()
            if suffix == ".json":
                handle.write(("," if count else "") + "\n  " + json.dumps(record))
            else:
                if not count:
                    writer.writeheader()
                writer.writerow(record)
            count, failed = count + 1, failed + (row.error is not None)
        handle.write("\n]\n" if suffix == ".json" else "")
    return count, failed
