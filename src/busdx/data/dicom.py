"""Read ultrasound DICOM files: one frame as 8-bit RGB, cropped to its B-mode region.

pydicom parses the file; compressed transfer syntaxes are decoded by GDCM (JPEG baseline,
extended 8-bit and lossless, JPEG-LS, JPEG 2000), pyjpegls (JPEG-LS), pylibjpeg-openjpeg
(JPEG 2000, HTJ2K), Pillow, and pydicom itself (RLE, deflate); all permissively licensed.
12-bit lossy JPEG needs pylibjpeg-libjpeg (GPL-3.0, so not a busdx dependency): install it
yourself if you have such files. Photometric interpretations MONOCHROME1 (inverted),
MONOCHROME2, RGB, YBR_FULL and YBR_FULL_422 (converted to RGB) and PALETTE COLOR are read,
8- to 16-bit (rescaled by the file's VOI window when it has one, else by its own range).

When the file has an Ultrasound Region Sequence (0018,6011), the image is cropped to its
largest two-dimensional tissue region (the B-mode field, without the scanner's UI around it),
and the region's physical pixel spacing is reported. Boxes (:mod:`busdx.data.boxes`) stay in the
coordinates of the full frame: :attr:`DicomFrame.origin` says where the crop starts.

Only modality ``US`` is read unless the environment variable ``BUSDX_ANY_MODALITY`` is ``1``
(``busdx predict --any-modality``): a CT slice is not an ultrasound image. Input files are only
ever read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from busdx.errors import ImageDecodeError, ImageTooLargeError, first_line

__all__ = [
    "ANY_MODALITY_ENV",
    "DICOM_EXTENSIONS",
    "DicomFrame",
    "count_frames",
    "frame_origin",
    "is_dicom_file",
    "looks_like_dicom",
    "read_dicom",
    "rescale_to_uint8",
]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
ANY_MODALITY_ENV = "BUSDX_ANY_MODALITY"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REGION_2D, _REGION_TISSUE, _UNITS_CM = 1, 1, 3  # DICOM PS3.3 C.8.5.5.1 enumerated values


@dataclass
class DicomFrame:
    """One decoded frame of a DICOM file and what the file says about its geometry."""

    image: Image.Image  # 8-bit RGB, cropped to the B-mode region when the file has one
    frame: int  # which frame (0-based)
    frames: int  # how many the file holds
    origin: tuple[int, int]  # (x, y) of the image's top-left pixel in the full frame
    pixel_spacing_mm: tuple[float, float] | None  # (column, row) spacing: x then y
    modality: str


def looks_like_dicom(head: bytes) -> bool:
    """True when the first 132 bytes of a file carry the DICOM Part 10 preamble marker."""
    return head[128:132] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` / ``.dicom`` file, or any file that starts like DICOM Part 10."""
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with path.open("rb") as handle:
            return looks_like_dicom(handle.read(132))
    except OSError:
        return False


def _open(source: Path | BinaryIO, name: str, *, pixels: bool):
    """Parse a DICOM file; a ``.dcm`` file without the Part 10 preamble is parsed anyway."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(source, stop_before_pixels=not pixels)
    except InvalidDicomError as exc:
        if Path(name).suffix.lower() not in DICOM_EXTENSIONS:
            raise ImageDecodeError(f"{name}: not a DICOM file ({first_line(exc)})") from exc
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            return pydicom.dcmread(source, stop_before_pixels=not pixels, force=True)
        except Exception as retry:
            raise ImageDecodeError(f"{name}: not a DICOM file ({first_line(retry)})") from exc
    except Exception as exc:  # a damaged file fails in the parser in many ways
        raise ImageDecodeError(f"{name}: cannot read DICOM file ({first_line(exc)})") from exc


def _check_modality(dataset, name: str) -> str:
    modality = str(dataset.get("Modality", "") or "").upper()
    if modality != "US" and os.environ.get(ANY_MODALITY_ENV) != "1":
        raise ImageDecodeError(
            f"{name}: modality {modality or '(none)'} is not ultrasound (US); pass "
            f"--any-modality (or set {ANY_MODALITY_ENV}=1) to read it anyway"
        )
    return modality


def count_frames(source: Path | BinaryIO, name: str | None = None) -> int:
    """How many frames a DICOM file holds (its header only is read)."""
    name = name or str(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = _open(source, name, pixels=False)
    _check_modality(dataset, name)
    try:
        return max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    except (ValueError, TypeError) as exc:
        raise ImageDecodeError(f"{name}: malformed Number of Frames ({first_line(exc)})") from exc


def read_dicom(
    source: Path | BinaryIO, name: str, *, frame: int = 0, max_pixels: int
) -> DicomFrame:
    """Decode ``frame`` of a DICOM file; :class:`ImageDecodeError` with the reason when it has
    no pixel data, a transfer syntax no installed decoder reads, another modality than US, no
    such frame, or damaged data."""
    with warnings.catch_warnings():  # pydicom warns about oddities it reads past
        warnings.simplefilter("ignore", UserWarning)
        dataset = _open(source, name, pixels=True)
        if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
            raise ImageDecodeError(f"{name}: DICOM file has no pixel data (not an image)")
        modality = _check_modality(dataset, name)
        try:
            return _read_frame(dataset, name, frame, max_pixels, modality)
        except ImageDecodeError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ImageDecodeError(f"{name}: malformed DICOM header ({first_line(exc)})") from exc


def _read_frame(dataset, name: str, frame: int, max_pixels: int, modality: str) -> DicomFrame:
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {columns}x{rows} pixels exceeds the limit of {max_pixels:,}"
        )
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise ImageDecodeError(f"{name}: has {frames} frame(s); there is no frame {frame}")
    pixels = _decode_pixels(dataset, name, frame)
    image = Image.fromarray(_to_rgb8(pixels, dataset))
    left, top, right, bottom = _bmode_region(dataset, image.size) or (0, 0, *image.size)
    return DicomFrame(
        image=image.crop((left, top, right, bottom)),
        frame=frame,
        frames=frames,
        origin=(left, top),
        pixel_spacing_mm=_pixel_spacing(dataset),
        modality=modality,
    )


def _decode_pixels(dataset, name: str, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    try:
        return pixel_array(dataset, index=frame)
    except (NotImplementedError, RuntimeError) as exc:
        described = f"{syntax.name} ({syntax})" if syntax else "(unknown)"
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ImageDecodeError(
            f"{name}: cannot decode transfer syntax {described}: "
            + ("; ".join(reasons) or first_line(exc))
        ) from exc
    except Exception as exc:  # truncated or inconsistent pixel data
        raise ImageDecodeError(f"{name}: damaged DICOM pixel data ({first_line(exc)})") from exc


def _to_rgb8(pixels: np.ndarray, dataset) -> np.ndarray:
    """A decoded frame (rows, columns[, samples]) as uint8 RGB (rows, columns, 3)."""
    from pydicom.pixels import apply_color_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
    elif pixels.ndim == 2 and pixels.dtype != np.uint8 and "WindowCenter" in dataset:
        pixels = apply_voi_lut(pixels, dataset)
    if pixels.dtype != np.uint8:
        pixels = rescale_to_uint8(pixels)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Any numeric array scaled by its own range to 0..255 uint8 (a flat array gives 0)."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def _two_d_regions(dataset) -> list:
    regions = dataset.get("SequenceOfUltrasoundRegions") or []
    return [r for r in regions if int(r.get("RegionSpatialFormat", 0) or 0) == _REGION_2D]


def _largest(regions: list):
    tissue = [r for r in regions if int(r.get("RegionDataType", 0) or 0) == _REGION_TISSUE]

    def area(region) -> int:
        return (int(region.RegionLocationMaxX1) - int(region.RegionLocationMinX0) + 1) * (
            int(region.RegionLocationMaxY1) - int(region.RegionLocationMinY0) + 1
        )

    return max(tissue or regions, key=area) if regions else None


def _bmode_region(dataset, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the largest 2D tissue region, clipped to the frame."""
    region = _largest(_two_d_regions(dataset))
    if region is None:
        return None
    width, height = size
    left = min(max(int(region.RegionLocationMinX0), 0), width - 1)
    top = min(max(int(region.RegionLocationMinY0), 0), height - 1)
    right = min(int(region.RegionLocationMaxX1) + 1, width)
    bottom = min(int(region.RegionLocationMaxY1) + 1, height)
    return (left, top, right, bottom) if right > left and bottom > top else None


def frame_origin(dataset) -> tuple[int, int]:
    """(x, y) in the full frame of the top-left pixel of what busdx reads from ``dataset`` (the
    B-mode region's corner, see :func:`read_dicom`; (0, 0) without a region)."""
    size = (int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0))
    region = _bmode_region(dataset, size)
    return (0, 0) if region is None else region[:2]


def _pixel_spacing(dataset) -> tuple[float, float] | None:
    """(x, y) millimetres per pixel: the B-mode region's physical deltas (in cm), else the
    file's Pixel Spacing (row spacing, column spacing, in mm)."""
    region = _largest(_two_d_regions(dataset))
    if region is not None and int(region.get("PhysicalUnitsXDirection", 0) or 0) == _UNITS_CM:
        return 10 * float(region.PhysicalDeltaX), 10 * float(region.PhysicalDeltaY)
    spacing = dataset.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        return float(spacing[1]), float(spacing[0])
    return None
