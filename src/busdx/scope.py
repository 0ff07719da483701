"""Out-of-scope guard: how far an input lies from the images the model was trained on.

A classifier gives every input a label, a photo of a cat or a 1x1 PNG included. The guard
scores each input by the Mahalanobis distance of its globally average-pooled backbone features
from the training images' features (mean and a Ledoit-Wolf shrunk covariance, fitted at
training time and stored in the model file), and flags it as out of scope above a threshold:
the ``quantile`` of the distances of the held-out validation images (in scope by definition),
times ``margin``. A flag means "this does not look like the scans the model learned from; do not
trust its label", not that the image is abnormal.

Feature distances miss some inputs that are plainly not B-mode scans (a flat or tiny image can
land near the training mean), so :func:`image_checks` adds four rules on the pixels themselves,
with wide margins around what 913 BUSI and BrEaST images show (smallest side 159 px, aspect
ratio up to 3.2, at most 0.9% coloured pixels, grey-level standard deviation at least 20).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageStat
from sklearn.covariance import LedoitWolf

from busdx.imaging import InputLike, as_input
from busdx.models import BinaryClassifier, Ensemble
from busdx.transforms import Preprocessing, build_eval_transform, load_region

__all__ = ["SCOPE_KEY", "fit_scope", "image_checks", "pooled_features", "scope_distances"]

SCOPE_KEY = "scope"


MIN_SIDE = 32  # pixels
MAX_ASPECT = 5.0
MAX_COLOURED = 0.05  # share of pixels whose channels differ by more than 40 grey levels
MIN_GREY_STD = 5.0  # grey levels


def image_checks(image: Image.Image) -> list[str]:
    """Reasons why an image cannot be a B-mode ultrasound scan (empty when none applies)."""
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        return [f"too small for a scan ({width}x{height} px)"]
    reasons = []
    if max(width, height) / min(width, height) > MAX_ASPECT:
        reasons.append(f"extreme aspect ratio ({width}x{height} px)")
    red, green, blue = np.moveaxis(np.asarray(image.convert("RGB")), 2, 0)  # uint8 planes
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    if np.count_nonzero(spread > 40) / spread.size > MAX_COLOURED:
        reasons.append("a colour image (B-mode ultrasound is greyscale)")
    if ImageStat.Stat(image.convert("L")).stddev[0] < MIN_GREY_STD:  # 10x numpy's speed
        reasons.append("a nearly uniform image")
    return reasons


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
    files: Sequence[InputLike],
    device: torch.device,
    batch_size: int = 16,
) -> np.ndarray:
    transform = build_eval_transform(prep)
    parts = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = torch.stack([transform(load_region(as_input(p), prep)) for p in chunk])
        parts.append(pooled_features(model, batch.to(device)).cpu().numpy())
    return np.concatenate(parts)


def fit_scope(
    model: BinaryClassifier | Ensemble,
    prep: Preprocessing,
    train_files: Sequence[InputLike],
    held_out_files: Sequence[InputLike],
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
