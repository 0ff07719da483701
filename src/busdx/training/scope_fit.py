"""The out-of-scope guard's torch side: fitting it on a trained model's pooled features, and
the distance as a module for ONNX export. What it measures and why it no longer withholds labels:
:mod:`busdx.inference.scope`, where inference computes the distance without torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from busdx.data.imaging import InputLike, as_input
from busdx.data.preprocess import Preprocessing, load_region
from busdx.inference.model_file import ScopeGuard
from busdx.inference.scope import scope_distances
from busdx.networks.classifier import BinaryClassifier, Ensemble
from busdx.training.transforms import build_eval_transform

__all__ = ["Guard", "fit_scope", "logits_and_features", "mahalanobis", "pooled_features"]


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
) -> tuple[ScopeGuard, dict[str, torch.Tensor]]:
    """Fit the guard on training images; set its threshold on held-out in-scope images.
    Returns its settings and its arrays (``mean``, ``precision``: the model file's
    ``scope_arrays``)."""
    model.eval()
    train = _file_features(model, prep, train_files, device)
    # imported here, not at the top: scikit-learn takes 1-2 s to import
    from sklearn.covariance import LedoitWolf

    estimator = LedoitWolf().fit(train)
    mean = torch.from_numpy(estimator.location_.astype(np.float32))
    # float16: half the size in the model file (1280 x 1280 for EfficientNet-Lite, 3.3 MB
    # saved); distances are computed in float32 and move by about 1e-3 relative. Features with
    # almost no spread (an untrained model) give entries beyond float16's range: float32 then
    fits = np.abs(estimator.precision_).max() < np.finfo(np.float16).max
    precision = torch.from_numpy(estimator.precision_.astype(np.float16 if fits else np.float32))
    held_out = scope_distances({"mean": mean, "precision": precision},
                               _file_features(model, prep, held_out_files, device))  # fmt: skip
    guard = ScopeGuard(
        threshold=float(np.quantile(held_out, quantile) * margin), quantile=quantile,
        margin=margin, fitted_on=len(train_files), threshold_from=len(held_out_files),
        feature="global average of the backbone output",
    )  # fmt: skip
    return guard, {"mean": mean, "precision": precision}


def mahalanobis(
    features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Mahalanobis distance of each feature row from ``mean`` under ``precision``."""
    centred = features - mean
    return torch.sqrt(((centred @ precision) * centred).sum(dim=1).clamp_min(0))


def logits_and_features(
    model: BinaryClassifier | Ensemble, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the pooled features the guard scores, with one backbone pass
    for both (an ensemble's first member gives the features)."""
    first, *others = getattr(model, "members", [model])
    maps, tapped = first.run_backbone(first.stem(images), first.stem_layers)
    logits = torch.stack([first.classify(maps, tapped), *(m(images) for m in others)])
    return logits.float().mean(dim=0), maps.float().mean(dim=(2, 3))


class Guard(nn.Module):
    """The guard's distance as a module: pooled features -> Mahalanobis distance (exported
    inside ONNX models, where its nodes are named ``/guard/...`` and kept in float)."""

    ONNX_PREFIX = "/guard/"

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("precision", precision.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis(features, self.mean, self.precision)
