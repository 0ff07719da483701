"""Out-of-scope guard: how far an input lies from the images the model was trained on.

A classifier gives every input a label, a photo of a cat or a 1x1 PNG included. The guard
scores each input by the Mahalanobis distance of its globally average-pooled backbone features
from the training images' features (mean and a Ledoit-Wolf shrunk covariance, fitted at
training time and stored in the model file), and flags it as out of scope above a threshold:
the ``quantile`` of the distances of the held-out validation images (in scope by definition),
times ``margin``. A flag means "this does not look like the scans the model learned from; do not
trust its label", not that the image is abnormal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from busdx.imaging import load_image
from busdx.models import BinaryClassifier, Ensemble
from busdx.transforms import Preprocessing, build_eval_transform

__all__ = ["SCOPE_KEY", "fit_scope", "pooled_features", "scope_distances"]

SCOPE_KEY = "scope"


def _reference_member(model: BinaryClassifier | Ensemble) -> BinaryClassifier:
    """The classifier whose backbone defines the feature space (an ensemble's first member)."""
    return model.members[0] if isinstance(model, Ensemble) else model


@torch.inference_mode()
def pooled_features(model: BinaryClassifier | Ensemble, images: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled backbone output of a batch of preprocessed images."""
    return _reference_member(model).features(images).float().mean(dim=(2, 3))


def _file_features(
    model: BinaryClassifier | Ensemble,
    prep: Preprocessing,
    files: Sequence[Path],
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    transform = build_eval_transform(prep)
    parts = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([transform(load_image(p)) for p in files[start : start + batch_size]])
        parts.append(pooled_features(model, batch.to(device)).cpu().numpy())
    return np.concatenate(parts)


def fit_scope(
    model: BinaryClassifier | Ensemble,
    prep: Preprocessing,
    train_files: Sequence[Path],
    held_out_files: Sequence[Path],
    *,
    device: torch.device,
    quantile: float = 0.99,
    margin: float = 1.0,
) -> dict[str, Any]:
    """Fit the guard on training images; set its threshold on held-out in-scope images."""
    model.eval()
    train = _file_features(model, prep, train_files, device)
    estimator = LedoitWolf().fit(train)
    mean = torch.from_numpy(estimator.location_.astype(np.float32))
    precision = torch.from_numpy(estimator.precision_.astype(np.float32))
    held_out = _distances(_file_features(model, prep, held_out_files, device), mean, precision)
    return {
        "mean": mean,
        "precision": precision,
        "threshold": float(np.quantile(held_out, quantile) * margin),
        "quantile": quantile,
        "margin": margin,
        "fitted_on": len(train_files),
        "threshold_from": len(held_out_files),
        "feature": "global average of the backbone output",
    }


def _distances(features: np.ndarray, mean: torch.Tensor, precision: torch.Tensor) -> np.ndarray:
    centred = torch.as_tensor(features, dtype=torch.float32) - mean
    return torch.sqrt(((centred @ precision) * centred).sum(dim=1).clamp_min(0)).numpy()


def scope_distances(scope: dict[str, Any], features: torch.Tensor) -> np.ndarray:
    """Mahalanobis distance of each feature row from the training images."""
    return _distances(features.cpu().numpy(), scope["mean"], scope["precision"])
