"""Out-of-scope guard: how far an input lies from the images the model was trained on.

A classifier gives every input a label, a photo of a cat or a 1x1 PNG included. The guard
scores each input by the Mahalanobis distance of its globally average-pooled backbone features
from the training images' features (mean and a Ledoit-Wolf shrunk covariance, fitted at
training time and stored in the model file), and flags it as out of scope above a threshold:
the ``quantile`` of the distances of the held-out validation images (in scope by definition),
times ``margin``. A flag means "this does not look like the scans the model learned from; do not
trust its label", not that the image is abnormal.

Feature distances do not tell a scan from what is not one: at hospitals the model never saw
they flagged ordinary scans, and noise and near-white images landed inside. Whether an input is
a B-mode scan at all is therefore decided on its pixels by :func:`image_checks`: rules with
wide margins around what all 2,292 images of the three development sites show (256x256 grey:
neighbour correlation at least 0.897, at least 122 grey levels, at most 27% near-white pixels,
at most 0.9% coloured pixels, high-frequency share at least 0.101; docs/scope.md), measured on
a set of images that are not scans (noise in every mode, uniform, bilevel, text, Doppler,
radiograph- and mammogram-like, photos). An input that fails one gets no label. The feature
distance is still computed and reported (``scope_distance``); it no longer withholds labels.

This module needs no torch (inference runs without it); fitting the guard and its ONNX form
are in :mod:`busdx.training.scope_fit`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageStat

__all__ = [
    "coloured_share",
    "image_checks",
    "scope_distances",
    "texture_statistics",
]

MIN_SIDE = 32  # pixels
MAX_ASPECT = 5.0
MAX_COLOURED = 0.02  # share of pixels whose channels differ by more than 40 grey levels
MIN_GREY_STD = 5.0  # grey levels
CHECK_SIZE = 256  # the rules below look at the image as 256 x 256 grey
MIN_NEIGHBOUR_CORRELATION = 0.8  # speckle is spatially correlated; noise and fine texture not
MIN_GREY_LEVELS = 64  # bilevel images, drawings, phantoms
MAX_NEAR_WHITE = 0.5  # share of pixels above 225: pages, screenshots
MIN_DETAIL = 0.06  # share of the grey-level spread in detail finer than a 2-px blur


def coloured_share(image: Image.Image) -> float:
    """Share of pixels whose colour channels differ by more than 40 grey levels."""
    red, green, blue = np.moveaxis(np.asarray(image.convert("RGB")), 2, 0)  # uint8 planes
    spread = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    return np.count_nonzero(spread > 40) / spread.size


def image_checks(image: Image.Image) -> list[str]:
    """Reasons why an image cannot be a B-mode ultrasound scan (empty when none applies)."""
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        return [f"too small for a scan ({width}x{height} px)"]
    reasons = []
    if max(width, height) / min(width, height) > MAX_ASPECT:
        reasons.append(f"extreme aspect ratio ({width}x{height} px)")
    if coloured_share(image) > MAX_COLOURED:
        reasons.append("a colour image (B-mode ultrasound is greyscale)")
    grey = image.convert("L")
    if ImageStat.Stat(grey).stddev[0] < MIN_GREY_STD:  # 10x numpy's speed
        return [*reasons, "a nearly uniform image"]
    return reasons + _texture_checks(texture_statistics(grey))


def texture_statistics(grey: Image.Image) -> dict[str, float]:
    """What the texture rules look at, on a grey image at :data:`CHECK_SIZE` (smaller images
    as they are): grey levels used, share of near-white pixels, grey-level spread, neighbour
    correlation and the share of the spread in fine detail (the last two NaN for an image too
    uniform to have them)."""
    small = grey  # never enlarged: interpolation would make noise look correlated
    if min(grey.size) > CHECK_SIZE:
        small = grey.resize((CHECK_SIZE, CHECK_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32)
    spread = float(pixels.std())
    statistics = {
        "grey_levels": float(len(np.unique(np.asarray(grey)))),
        "near_white": float(np.mean(pixels > 225)),
        "spread": spread,
        "neighbour_correlation": math.nan,
        "detail": math.nan,
    }
    if spread >= MIN_GREY_STD:
        left, right = pixels[:, :-1].ravel(), pixels[:, 1:].ravel()
        blurred = np.asarray(small.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
        statistics["neighbour_correlation"] = float(np.corrcoef(left, right)[0, 1])
        statistics["detail"] = float((pixels - blurred).std() / spread)
    return statistics


def _texture_checks(statistics: dict[str, float]) -> list[str]:
    """The texture rules on :func:`texture_statistics`."""
    reasons = []
    if statistics["grey_levels"] < MIN_GREY_LEVELS:
        reasons.append("too few grey levels (a bilevel image, drawing or phantom)")
    if statistics["near_white"] > MAX_NEAR_WHITE:
        reasons.append("mostly white (a page or a screenshot)")
    if statistics["spread"] < MIN_GREY_STD:
        return [*reasons, "a nearly uniform image"]
    if statistics["neighbour_correlation"] < MIN_NEIGHBOUR_CORRELATION:
        reasons.append("no spatial structure (noise or a fine texture, not speckle)")
    if statistics["detail"] < MIN_DETAIL:
        reasons.append("too smooth for ultrasound speckle (a radiograph, mammogram or gradient)")
    return reasons


def scope_distances(scope: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each pooled-feature row from the training images' mean under
    the guard's precision matrix, in float32 (the matrix is stored in float16)."""
    mean = np.asarray(scope["mean"], dtype=np.float32)
    precision = np.asarray(scope["precision"], dtype=np.float32)
    centred = np.asarray(features, dtype=np.float32) - mean
    return np.sqrt(np.clip(((centred @ precision) * centred).sum(axis=1), 0, None))
