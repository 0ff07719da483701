"""Model files: the metadata that makes ``model.pt`` usable on its own, written atomically.

A model file holds the weights and everything needed to use them without the run directory:
class names, preprocessing, threshold and temperature, the weights' checksum, the busdx
version and environment, and the resolved config. Only plain types and tensors are stored, so
it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from busdx import __version__
from busdx.config import Config
from busdx.fileio import atomic_path
from busdx.models import WeightsInfo
from busdx.preprocess import Preprocessing
from busdx.provenance import environment

__all__ = ["model_metadata", "save_model_file", "update_model_metadata"]


def model_metadata(
    config: Config, weights: WeightsInfo, prep: Preprocessing, class_names: list[str]
) -> dict[str, Any]:
    """Everything besides the tensors that a model file needs to be used on its own."""
    return {
        "format": "busdx-model",
        "format_version": 1,
        "busdx_version": __version__,
        "environment": environment(),
        "model": config.model.model_dump(),
        "class_names": list(class_names),
        "positive_class": config.data.positive_class,
        "threshold": 0.5,
        "preprocessing": prep.to_dict(),
        "weights": {"name": weights.name, "sha256": weights.sha256},
        "config": config.to_dict(),
    }


def save_model_file(path: Path, payload: dict[str, Any]) -> None:
    """Write a model file (tensors and plain metadata) atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def update_model_metadata(path: Path, updates: dict[str, Any]) -> None:
    """Rewrite a model file atomically with some metadata entries added or replaced."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    save_model_file(path, {**payload, **updates})
