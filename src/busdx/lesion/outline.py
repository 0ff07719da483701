"""From a mask predicted on the model's input back to the lesion on the scan: its outline in
the image's own pixel coordinates, its size (in mm where the pixel spacing is known) and its
descriptors (:func:`busdx.lesion.descriptors.describe_lesion`).

The model sees a rectangle of the scan (the whole image, the lesion box with its margin, or the
B-mode field), padded to a square or squashed, resized to its input size. :class:`RegionView`
remembers that rectangle, its grey pixels and the spacing, so :func:`lesion_from_mask` can undo
the padding and the resizing and place the outline on the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from busdx.data.boxes import crop_rectangle
from busdx.data.imaging import SPACING_KEY, Box
from busdx.data.preprocess import Preprocessing, content_box
from busdx.lesion.descriptors import Lesion, describe_lesion

__all__ = ["RegionView", "image_mask", "lesion_from_mask", "region_mask", "region_view"]


@dataclass(frozen=True)
class RegionView:
    """The rectangle of a scan the model looked at: its corner, its grey pixels and the pixel
    spacing (mm, x and y) when known."""

    left: int
    top: int
    grey: np.ndarray  # height x width, uint8
    spacing: tuple[float, float] | None


def region_view(
    image: Image.Image, box: Box | None, prep: Preprocessing,
    spacing: tuple[float, float] | None = None,
) -> RegionView:  # fmt: skip
    """Where in ``image`` the model's input comes from (see
    :func:`busdx.data.preprocess.region_of`; the B-mode field for ``crop: content``); ``spacing``
    when the file does not carry it (a DICOM's region spacing comes first)."""
    left, top, right, bottom = 0, 0, *image.size
    if prep.region == "box" and box is not None:
        left, top, right, bottom = crop_rectangle(image, box, margin=prep.box_margin)
    grey = image.crop((left, top, right, bottom)).convert("L")  # crop first: less to convert
    if prep.crop == "content":
        field = content_box(grey)
        left, top, grey = left + field[0], top + field[1], grey.crop(field)
    known = image.info.get(SPACING_KEY) or spacing
    return RegionView(left, top, np.asarray(grey), None if known is None else tuple(known))


def _unpad(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part of a square input that held the image (``resize: pad`` centres it)."""
    side = mask.shape[0]
    if width >= height:
        inner = round(side * height / width)
        top = (side - inner) // 2
        return mask[top : top + inner]
    inner = round(side * width / height)
    left = (side - inner) // 2
    return mask[:, left : left + inner]


def region_mask(
    mask: np.ndarray, view: RegionView, prep: Preprocessing, threshold: float = 0.5
) -> np.ndarray:
    """A mask of probabilities on the model's input, back on the region it came from (padding
    removed, resized to the region's size), as a binary mask: ``probability >= threshold``."""
    height, width = view.grey.shape
    if prep.resize == "pad":
        mask = _unpad(mask, width, height)
    probabilities = Image.fromarray(mask.astype(np.float32))
    return np.asarray(probabilities.resize((width, height), Image.Resampling.BILINEAR)) >= threshold


def image_mask(
    mask: np.ndarray, view: RegionView, prep: Preprocessing, size: tuple[int, int]
) -> np.ndarray:
    """:func:`region_mask` placed on the whole image of ``size`` (width, height)."""
    region = region_mask(mask, view, prep)
    whole = np.zeros(size[::-1], dtype=bool)
    top, left = max(view.top, 0), max(view.left, 0)
    part = region[top - view.top :, left - view.left :][: size[1] - top, : size[0] - left]
    whole[top : top + part.shape[0], left : left + part.shape[1]] = part
    return whole


def lesion_from_mask(
    mask: np.ndarray, view: RegionView, prep: Preprocessing, threshold: float = 0.5
) -> Lesion | None:
    """The lesion a mask (probabilities on the model's input) outlines, measured on the scan;
    None when no pixel reaches ``threshold``."""
    region = region_mask(mask, view, prep, threshold)
    return describe_lesion(region, view.grey, view.spacing, origin=(view.left, view.top))
