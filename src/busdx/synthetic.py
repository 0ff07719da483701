"""Synthetic breast-ultrasound-like images, for the demo and for tests that must run anywhere.

Benign lesions tend to be dark, smooth, oval masses wider than tall; malignant ones dark masses
with spiculated (star-like) margins, more often taller than wide, with posterior acoustic
shadowing. The two overlap, so the task is not trivially separable. Both sit in multiplicative
speckle over layered tissue with a random texture. No real patient data is involved.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["decompression_bomb_png", "make_lesion_image", "write_synthetic_dataset"]


def _speckle_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Layered tissue with a random smooth texture: every image has its own anatomy."""
    y = np.linspace(0, 1, size)[:, None]
    layers = 0.4 + 0.12 * np.sin(2 * np.pi * (rng.uniform(2, 4) * y + rng.uniform(0, 1))) + 0.1 * y
    coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=float) / 255
    tissue = layers + 0.35 * (texture - 0.5) + 0.06 * rng.standard_normal((size, size))
    return np.clip(tissue, 0.05, 1.0)


def make_lesion_image(
    malignant: bool, *, size: int = 256, seed: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """One 8-bit grayscale image and the (row, col) centre of its lesion.

    Irregularity is drawn from overlapping ranges (benign 0-0.5, malignant 0.4-1), so some
    benign lesions look suspicious and some cancers look smooth, as in real scans.
    """
    rng = np.random.default_rng(seed)
    image = _speckle_background(rng, size)
    cy, cx = (int(rng.uniform(0.35, 0.65) * size) for _ in range(2))
    yy, xx = np.mgrid[:size, :size]
    dy, dx = (yy - cy) / size, (xx - cx) / size
    angle = np.arctan2(dy, dx)
    base = rng.uniform(0.07, 0.12)
    irregularity = rng.uniform(0.4, 1.0) if malignant else rng.uniform(0.0, 0.5)
    spikes = rng.integers(6, 14)
    edge = base * (
        1 + 0.45 * irregularity * np.abs(np.sin(spikes * angle / 2 + rng.uniform(0, np.pi))) ** 3
    )
    tall = rng.uniform() < (0.1 + 0.6 * irregularity)  # taller-than-wide is suspicious
    stretch_x, stretch_y = (0.8, 1.2) if tall else (rng.uniform(1.2, 1.5), rng.uniform(0.7, 0.9))
    lesion = np.hypot(dx / stretch_x, dy / stretch_y) < edge
    shadow = (yy > cy) & (np.abs(xx - cx) < base * size * 0.8)
    image[shadow] *= 1 - 0.45 * irregularity  # posterior acoustic shadowing
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


def decompression_bomb_png(side: int = 30_000) -> bytes:
    """A valid black ``side`` x ``side`` one-bit PNG of about 100 KB (at 30,000: 900 megapixels):
    a decompression bomb, for tests and the API soak benchmark. Written row by row, so that its
    pixels never sit in memory at once."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    compressor, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # filter byte + pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks
