"""Decode image files of any common mode into 8-bit RGB, or fail with a clear error.

Ultrasound exports come as 8-bit grayscale, RGB, RGBA, palette and 16-bit grayscale PNG, JPEG,
BMP and TIFF. All of them are converted the same way: grayscale is replicated to three channels,
alpha is dropped, 16-bit and float data are rescaled by their own range to 0..255.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from busdx.errors import ImageDecodeError, ImageTooLargeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "decode_image",
    "is_image_file",
    "load_image",
    "to_rgb",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs above 100 megapixels


def is_image_file(path: Path) -> bool:
    """True for a file with an image extension (any case) that is not a segmentation mask."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and "_mask" not in path.stem.lower()


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        return Image.fromarray(_rescale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # ultrasound pixels carry no meaning in alpha: drop it rather than blend
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read ``path`` fully and return it as an 8-bit RGB PIL image.

    Raises :class:`ImageDecodeError` for a missing, empty, truncated or non-image file, or one
    larger than ``max_pixels``. Multi-frame files (TIFF pages, GIF) use the first frame.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    return _decode(path, str(path), path.stat().st_size, max_pixels)


def decode_image(
    data: bytes, name: str = "upload", *, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """:func:`load_image` for bytes in memory (an upload); ``name`` appears in errors."""
    return _decode(io.BytesIO(data), name, len(data), max_pixels)


def _decode(source: Path | BinaryIO, name: str, size: int, max_pixels: int) -> Image.Image:
    if size == 0:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # busdx applies its own pixel limit below; Pillow's warning (above ~89 MP) is
            # silenced, its error (above twice that, raised while reading the header) is caught
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels:,}"
                    )
                image.load()
                return to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: {_first_line(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not a readable image file") from exc
    except Exception as exc:  # a decoder can fail in many ways on a damaged file
        raise ImageDecodeError(f"{name}: cannot decode image ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
