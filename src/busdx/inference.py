"""Load a trained model file and predict the probability of malignancy for image files.

Model files are read with ``torch.load(..., weights_only=True)``: an untrusted file cannot run
code. A file that cannot be decoded yields an error row; the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from busdx.config import ModelConfig
from busdx.errors import CheckpointError, DataError, ImageDecodeError
from busdx.imaging import is_image_file, load_image
from busdx.models import BinaryClassifier, create_model
from busdx.training import MODEL_FILE, resolve_device
from busdx.transforms import Preprocessing, build_eval_transform

__all__ = ["LoadedModel", "Prediction", "expand_paths", "load_model", "predict_files"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A trained classifier in eval mode with everything needed to use it."""

    model: BinaryClassifier
    metadata: dict[str, Any]
    preprocessing: Preprocessing
    device: torch.device

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

    @torch.inference_mode()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Raw log-odds of the positive class for a batch of preprocessed images."""
        return self.model(images.to(self.device)).cpu()


def load_model(path: str | Path, *, device: str = "auto") -> LoadedModel:
    """Load ``model.pt`` (or a run directory containing one) safely."""
    path = Path(path)
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
    model, _, _ = create_model(config, image_size=prep.image_size, load_weights=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model it describes") from exc
    target = resolve_device(device)
    model.to(target).eval()
    metadata = {k: v for k, v in payload.items() if k not in {"state_dict", "optimizer"}}
    return LoadedModel(model, metadata, prep, target)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given plus image files found (recursively, sorted) under given folders."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


@dataclass
class Prediction:
    """One output row: a probability and label, or the reason there is none."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    logit: float | None = None  # before temperature scaling

    def to_dict(self) -> dict[str, Any]:
        prob = None if self.probability is None else round(self.probability, 6)
        return {
            "path": self.path,
            "probability_malignant": prob,
            "label": self.label,
            "threshold": self.threshold,
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
    files: Sequence[Path],
    *,
    batch_size: int = 16,
    progress: bool = True,
    threshold: float | None = None,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per file, in order, batch by batch."""
    threshold = loaded.threshold if threshold is None else threshold
    transform = build_eval_transform(loaded.preprocessing)
    negative, positive = loaded.class_names
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, leave=False)
    for batch in _batches(files, batch_size):
        tensors, rows = [], []
        for path in batch:
            try:
                tensors.append(transform(load_image(path)))
                rows.append(Prediction(str(path), None, None, threshold))
            except ImageDecodeError as exc:
                logger.warning("%s", exc)
                rows.append(Prediction(str(path), None, None, threshold, error=str(exc)))
        logits = loaded.predict_logits(torch.stack(tensors)) if tensors else torch.zeros(0)
        probabilities = torch.sigmoid(logits / loaded.temperature)
        scores = iter(zip(logits.tolist(), probabilities.tolist(), strict=True))
        for row in rows:
            if row.error is None:
                row.logit, row.probability = next(scores)
                row.label = positive if row.probability >= threshold else negative
            bar.update()
            yield row
    bar.close()
