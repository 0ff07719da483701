"""Decode image files of any common mode into 8-bit RGB, or fail with a clear error.

Ultrasound exports come as 8-bit grayscale, RGB, RGBA, palette and 16-bit grayscale PNG, JPEG,
BMP and TIFF, and scanners and PACS hand out DICOM (:mod:`busdx.data.dicom`, recognised by its
``.dcm`` / ``.dicom`` extension or by its content). All of them are converted the same way:
grayscale is replicated to three channels, alpha is dropped, 16-bit and float data are rescaled
by their own range to 0..255.

An :class:`ImageInput` names one image to classify: a file, the frame in it (DICOM), and
optionally the lesion box in it (see :mod:`busdx.data.boxes`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from busdx.data.dicom import DICOM_EXTENSIONS, looks_like_dicom, read_dicom, rescale_to_uint8
from busdx.errors import ImageDecodeError, ImageTooLargeError, first_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ORIGIN_KEY",
    "SPACING_KEY",
    "Box",
    "ImageInput",
    "InputLike",
    "as_input",
    "decode_image",
    "is_image_file",
    "load_image",
    "to_rgb",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} | DICOM_EXTENSIONS)
MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs above 100 megapixels
ORIGIN_KEY = "busdx_origin"  # image.info: (x, y) of a cropped DICOM region in its full frame
SPACING_KEY = "busdx_pixel_spacing_mm"  # image.info: (x, y) millimetres per pixel, if known

Box = tuple[int, int, int, int]  # (x, y, width, height) in pixels of the file's full frame


@dataclass(frozen=True)
class ImageInput:
    """One image to read: a file, the frame in it (DICOM; 0 otherwise), and the lesion box
    in it when one is given (required by a model trained on lesion boxes)."""

    path: Path
    frame: int = 0
    box: Box | None = None

    @property
    def name(self) -> str:
        """How the input is named in output rows and messages."""
        return str(self.path) + (f" [frame {self.frame}]" if self.frame else "")


InputLike = str | Path | ImageInput  # what functions that read images accept


def as_input(item: InputLike) -> ImageInput:
    """A path as an :class:`ImageInput` (first frame, no box); an ImageInput unchanged."""
    return item if isinstance(item, ImageInput) else ImageInput(Path(item))


def is_image_file(path: Path) -> bool:
    """True for a file with an image extension (any case) that is not a segmentation mask."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and "_mask" not in path.stem.lower()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        return Image.fromarray(rescale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # ultrasound pixels carry no meaning in alpha: drop it rather than blend
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | Path, *, frame: int = 0, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Read ``path`` fully and return it as an 8-bit RGB PIL image.

    Raises :class:`ImageDecodeError` for a missing, empty, truncated or non-image file, or one
    larger than ``max_pixels``. Multi-frame TIFF and GIF files use their first frame, DICOM
    files their ``frame`` (see :mod:`busdx.data.dicom`: cropped to the B-mode region, whose
    offset and pixel spacing are kept in ``image.info`` under :data:`ORIGIN_KEY` and
    :data:`SPACING_KEY`).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    with path.open("rb") as handle:
        return _decode(handle, str(path), path.stat().st_size, max_pixels, frame)


def decode_image(
    data: bytes, name: str = "upload", *, frame: int = 0, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """:func:`load_image` for bytes in memory (an upload); ``name`` appears in errors."""
    return _decode(io.BytesIO(data), name, len(data), max_pixels, frame)


def _decode(source: BinaryIO, name: str, size: int, max_pixels: int, frame: int) -> Image.Image:
    if size == 0:
        raise ImageDecodeError(f"{name}: file is empty (0 bytes)")
    head = source.read(132)
    source.seek(0)
    if looks_like_dicom(head) or Path(name).suffix.lower() in DICOM_EXTENSIONS:
        decoded = read_dicom(source, name, frame=frame, max_pixels=max_pixels)
        decoded.image.info[ORIGIN_KEY] = decoded.origin
        decoded.image.info[SPACING_KEY] = decoded.pixel_spacing_mm
        return decoded.image
    if frame:
        raise ImageDecodeError(f"{name}: only DICOM files have frames to choose from")
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
        raise ImageTooLargeError(f"{name}: {first_line(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not a readable image file") from exc
    except Exception as exc:  # a decoder can fail in many ways on a damaged file
        raise ImageDecodeError(f"{name}: cannot decode image ({first_line(exc)})") from exc
