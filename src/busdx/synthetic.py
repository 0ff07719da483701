"""Synthetic breast-ultrasound-like images, for the demo and for tests that must run anywhere.

Benign lesions are drawn as dark, smooth, round-to-oval masses wider than tall; malignant ones as
dark irregular masses with spiculated (star-like) margins, often taller than wide, with posterior
acoustic shadowing. Both sit in multiplicative speckle over layered tissue texture. No real
patient data is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_lesion_image", "write_synthetic_dataset"]


def _speckle_background(rng: np.random.Generator, size: int) -> np.ndarray:
    y = np.linspace(0, 1, size)[:, None]
    layers = 0.45 + 0.15 * np.sin(2 * np.pi * (3 * y + rng.uniform(0, 1))) + 0.1 * y
    tissue = np.repeat(layers, size, axis=1)
    tissue += 0.08 * rng.standard_normal((size, size))
    return np.clip(tissue, 0.05, 1.0)


def make_lesion_image(
    malignant: bool, *, size: int = 256, seed: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """One 8-bit grayscale image and the (row, col) centre of its lesion."""
    rng = np.random.default_rng(seed)
    image = _speckle_background(rng, size)
    cy, cx = (int(rng.uniform(0.35, 0.65) * size) for _ in range(2))
    yy, xx = np.mgrid[:size, :size]
    dy, dx = (yy - cy) / size, (xx - cx) / size
    angle, radius = np.arctan2(dy, dx), np.hypot(dy, dx)
    base = rng.uniform(0.08, 0.13)
    if malignant:
        spikes = rng.integers(7, 14)
        edge = base * (
            1
            + 0.35 * np.abs(np.sin(spikes * angle / 2 + rng.uniform(0, np.pi))) ** 3
            + 0.1 * np.sin(3 * angle + rng.uniform(0, np.pi))
        )
        edge = edge * np.where(np.abs(np.sin(angle)) > 0.7, 1.15, 0.9)  # taller than wide
        lesion = radius < edge
        shadow = (yy > cy) & (np.abs(xx - cx) < base * size * 0.8)
        image[shadow] *= 0.6
    else:
        stretch_x, stretch_y = rng.uniform(1.2, 1.6), rng.uniform(0.7, 0.9)  # wider than tall
        lesion = np.hypot(dx / stretch_x, dy / stretch_y) < base * 0.9
    image[lesion] = 0.08 + 0.05 * rng.random(lesion.sum())
    image *= rng.rayleigh(0.8, (size, size))  # multiplicative speckle
    pixels = np.clip(image / max(image.max(), 1e-6) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L"), (cy, cx)


def write_synthetic_dataset(root: str | Path, *, n_per_class: int = 40, seed: int = 0) -> Path:
    """Write ``root/benign/*.png`` and ``root/malignant/*.png`` (the BUSI layout)."""
    root = Path(root)
    for label, name in enumerate(("benign", "malignant")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image, _ = make_lesion_image(bool(label), seed=seed * 100_000 + label * 10_000 + i)
            image.save(folder / f"{name} ({i + 1}).png")
    return root
