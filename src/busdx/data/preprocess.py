"""Preprocessing for inference, in NumPy and Pillow: how a decoded image becomes the network's
input. No torch: ``busdx predict``, ``busdx serve`` and the ONNX backend run on this alone, and
training's deterministic step (:func:`busdx.training.transforms.build_decode_transform`) calls
the same :func:`prepare`, so the pixels a model is evaluated on are the pixels it is served.

Preprocessing belongs to the pretrained weights (see ``weights.py``): the VGG16 ImageNet weights
want Caffe-style input, ``x = rgb_0_255 - mean`` with no scaling by std. It is stored in every
model file, so evaluation, prediction and serving always match training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from busdx.data.boxes import crop_to_box, read_mask
from busdx.data.imaging import Box, ImageInput, load_image
from busdx.errors import BoxError

__all__ = [
    "Preprocessing",
    "annotation_mask",
    "content_box",
    "load_region",
    "load_region_and_mask",
    "mask_annotations",
    "model_input",
    "normalize",
    "pad_to_square",
    "prepare",
    "region_of",
]

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an 8-bit RGB image becomes the network's input.

    Optionally paint over burned-in annotations (``annotations="mask"``, see
    :func:`annotation_mask`), crop to the scan's content (``crop="content"``, see
    :func:`content_box`), then resize to ``image_size`` squared, either squashing the aspect
    ratio (``resize="squash"``, the recipe) or padding the shorter side with black first
    (``"pad"``), then ``(x - mean) / std`` with ``mean`` and ``std`` in 0..255 pixel units,
    per RGB channel.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop: str = "none"
    resize: str = "squash"
    annotations: str = "keep"
    region: str = "image"  # "box": the model sees the lesion box (with its margin) only
    box_margin: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for model files and JSON."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            interpolation=str(values.get("interpolation", "bilinear")),
            crop=str(values.get("crop", "none")),
            resize=str(values.get("resize", "squash")),
            annotations=str(values.get("annotations", "keep")),
            region=str(values.get("region", "image")),
            box_margin=float(values.get("box_margin", 0.0)),
        )


def region_of(
    image: Image.Image,
    box: Box | None,
    prep: Preprocessing,
    *,
    jitter: float = 0.0,
    name: str = "image",
) -> Image.Image:
    """The part of ``image`` a model looks at: for a model trained in ROI mode, ``box`` enlarged
    by its margin (``jitter``: random edges, in training); for a whole-image model, the image.

    :class:`BoxError` when an ROI model gets no box or a whole-image model gets one.
    """
    if prep.region != "box":
        if box is not None:
            raise BoxError(f"{name}: this model was trained on whole images; it takes no box")
        return image
    if box is None:
        raise BoxError(
            f"{name}: this model classifies a lesion box; give one (--box x,y,w,h or "
            f"--boxes FILE, the API's box field, or draw it on the web page)"
        )
    return crop_to_box(image, box, margin=prep.box_margin, jitter=jitter, name=name)


def load_region(item: ImageInput, prep: Preprocessing, *, jitter: float = 0.0) -> Image.Image:
    """Read ``item`` (its DICOM frame) and crop it as ``prep`` says (:func:`region_of`)."""
    image = load_image(item.path, frame=item.frame)
    return region_of(image, item.box, prep, jitter=jitter, name=item.name)


def load_region_and_mask(
    item: ImageInput, masks: Sequence[Path], prep: Preprocessing, *, jitter: float = 0.0
) -> Image.Image:
    """:func:`load_region` with the lesion mask (the union of ``masks``; empty when there is
    none) as the alpha channel, so that every crop, pad, resize and random geometric step that
    follows moves image and mask together (see :func:`build_augment_transform`)."""
    image = load_image(item.path, frame=item.frame)
    image.putalpha(read_mask(masks, image.size) if masks else 0)
    return region_of(image, item.box, prep, jitter=jitter, name=item.name)


def content_box(
    image: Image.Image, *, dark: int = 12, texture: float = 2.0, min_fill: float = 0.3,
    max_gap: float = 0.15,
) -> tuple:  # fmt: skip
    """Bounding box ``(left, top, right, bottom)`` of the B-mode field in a scan or screenshot:
    the largest textured region.

    A pixel belongs to the field when it is brighter than ``dark`` and textured (the standard
    deviation of its 5 x 5 neighbourhood above ``texture`` grey levels: speckle is, black
    margins and flat UI bars and panels are not). A row or column belongs to the field when at
    least ``min_fill`` of its pixels do (thin text and lines do not fill a row); gaps shorter
    than ``max_gap`` of the side (a dark cyst or shadow across the field) are closed, so a
    text line that close to the field is kept with it, runs shorter than 5% of the side are
    dropped, and the box spans the longest run of rows and of columns. When that leaves less
    than a quarter of the image (a cyst too large to bridge), the whole image is kept: a crop
    must never cut a lesion away. docs/levers.md section 12 measures how often it does.
    """
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    mean = ndimage.uniform_filter(grey, 5)
    spread = np.sqrt(np.clip(ndimage.uniform_filter(grey * grey, 5) - mean * mean, 0, None))
    field = (grey > dark) & (spread > texture)
    spans = []
    for axis in (0, 1):  # columns (fill over rows), then rows
        filled = field.mean(axis=axis) >= min_fill
        gap, shortest = (max(1, int(share * len(filled))) for share in (max_gap, 0.05))
        filled = ndimage.binary_closing(np.pad(filled, gap), np.ones(gap))[gap:-gap]
        filled = ndimage.binary_opening(filled, np.ones(shortest))  # a lone text line goes
        runs, count = ndimage.label(filled)
        if not count:
            spans.append((0, len(filled)))
            continue
        longest = np.argmax(np.bincount(runs)[1:]) + 1
        where = np.flatnonzero(runs == longest)
        spans.append((int(where[0]), int(where[-1]) + 1))
    (left, right), (top, bottom) = spans
    if (right - left) * (bottom - top) < 0.25 * grey.size:
        return (0, 0, image.width, image.height)
    return (left, top, right, bottom)


def annotation_mask(
    image: Image.Image, *, contrast: float = 60, brightness: int = 190, grow: int = 2
) -> np.ndarray:
    """Where burned-in annotations probably are: a boolean (height, width) array.

    Calipers, dotted measurement lines, text and markers are drawn in near-white, thin strokes:
    a pixel is marked when it is brighter than ``brightness`` and than the median of its 7 x 7
    neighbourhood by ``contrast``, or when it is coloured (an RGB spread above 40); the marks are
    then grown by ``grow`` pixels to cover their anti-aliased edges. A heuristic: thin specular
    reflections of tissue (skin line, Cooper's ligaments) can be marked too, and strokes blurred
    by downscaling may be missed (see docs/levers.md for how it does on BUSI and BrEaST).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    bright = (grey > brightness) & (grey - ndimage.median_filter(grey, size=7) > contrast)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 40
    return ndimage.binary_dilation(bright | coloured, iterations=grow)


def mask_annotations(image: Image.Image) -> Image.Image:
    """Paint :func:`annotation_mask` pixels over with the grey median of their 11 x 11
    neighbourhood (an inpainting that keeps the speckle's local brightness)."""
    marks = annotation_mask(image)
    if not marks.any():
        return image
    grey = np.asarray(image.convert("L"))
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[marks] = ndimage.median_filter(grey, size=11)[marks][:, None]
    painted = Image.fromarray(pixels)
    if image.mode == "RGBA":  # a lesion mask riding along (see load_region_and_mask)
        painted.putalpha(image.getchannel("A"))
    return painted


def pad_to_square(image: Image.Image) -> Image.Image:
    """``image`` pasted on a black, centred square (its aspect ratio kept)."""
    if image.width == image.height:
        return image
    side = max(image.size)
    canvas = Image.new(image.mode, (side, side))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _resize(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Pillow's antialiased resize to ``size`` squared; an RGBA image (a lesion mask riding in
    the alpha channel) is resized channel by channel, as Pillow would premultiply the colour
    by the alpha and blacken the image outside the lesion."""
    resample = RESAMPLING[interpolation]
    if image.mode != "RGBA":
        return image.resize((size, size), resample)
    bands = [band.resize((size, size), resample) for band in image.split()]
    return Image.merge("RGBA", bands)


def prepare(
    image: Image.Image,
    prep: Preprocessing,
    *,
    paint: Callable[[Image.Image], Image.Image] = mask_annotations,
) -> np.ndarray:
    """The deterministic part of preprocessing: an RGB (or RGBA, the alpha a lesion mask)
    image, its annotations painted over (``annotations: mask``, with ``paint``), cropped to its
    B-mode field (``crop: content``), padded to a square (``resize: pad``) and resized to
    ``image_size`` squared: uint8, height x width x channels (a grey image becomes RGB)."""
    if image.mode not in {"RGB", "RGBA"}:
        image = image.convert("RGB")
    if prep.annotations == "mask":
        image = paint(image)
    if prep.crop == "content":
        image = image.crop(content_box(image))
    if prep.resize == "pad":
        image = pad_to_square(image)
    return np.array(_resize(image, prep.image_size, prep.interpolation))


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 RGB pixels (..., height, width, 3) -> float32 network input (..., 3, height,
    width): ``(x - mean) / std`` per channel, in 0..255 units."""
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    scaled = (pixels.astype(np.float32) - mean) / std
    return np.ascontiguousarray(np.moveaxis(scaled, -1, -3))


def model_input(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded RGB image -> the network's float32 input (3 x size x size)."""
    return normalize(prepare(image, prep), prep)
