"""Preprocessing and augmentation: the only place where pixels are turned into tensors.

Preprocessing belongs to the pretrained weights (see ``weights.py``): the VGG16 ImageNet weights
want Caffe-style input, ``x = rgb_0_255 - mean`` with no scaling by std. It is stored in every
model file, so evaluation, prediction and serving always match training.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision.transforms import v2

from busdx.boxes import crop_to_box, read_mask
from busdx.config import AugmentConfig
from busdx.errors import BoxError
from busdx.imaging import Box, ImageInput, load_image

__all__ = [
    "ContentCrop",
    "MaskAnnotations",
    "PadToSquare",
    "Preprocessing",
    "SplitMask",
    "UltrasoundIntensity",
    "annotation_mask",
    "build_augment_transform",
    "build_decode_transform",
    "build_eval_transform",
    "build_normalize_transform",
    "build_train_transform",
    "content_box",
    "load_region",
    "load_region_and_mask",
    "mask_annotations",
    "region_of",
]

INTENSITY_KEYS = ("gain", "contrast", "gamma", "speckle", "blur", "attenuation", "shadow")


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


class MaskAnnotations(v2.Transform):
    """:func:`mask_annotations` as a transform, remembering its results by image content.

    The masking is deterministic and costs about 0.1 s per 256 x 256 image on a CPU core, more
    than the rest of an epoch's augmentation; training sees every image 30 times, so results are
    kept (keyed by a digest of the pixels) until they fill ``cache_bytes``.
    """

    def __init__(self, cache_bytes: int = 512 * 2**20) -> None:
        super().__init__()
        self.cache_bytes = cache_bytes
        self._cache: dict[bytes, Image.Image] = {}
        self._cached_bytes = 0

    def forward(self, image: Image.Image) -> Image.Image:  # type: ignore[override]
        key = hashlib.blake2b(
            f"{image.mode}{image.size}".encode() + image.tobytes(), digest_size=16
        ).digest()
        if key in self._cache:
            return self._cache[key].copy()
        masked = mask_annotations(image)
        size = len(masked.tobytes())
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = masked.copy()
            self._cached_bytes += size
        return masked


class ContentCrop(v2.Transform):
    """Crop a PIL image to :func:`content_box`."""

    def forward(self, image: Image.Image) -> Image.Image:  # type: ignore[override]
        return image.crop(content_box(image))


class PadToSquare(v2.Transform):
    """Pad a PIL image with black to a centred square, keeping its aspect ratio."""

    def forward(self, image: Image.Image) -> Image.Image:  # type: ignore[override]
        side = max(image.size)
        if image.width == image.height:
            return image
        canvas = Image.new(image.mode, (side, side))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas


def _geometry(prep: Preprocessing) -> list[v2.Transform]:
    """PIL-level steps before the tensor conversion: annotation masking, content crop,
    aspect-keeping pad."""
    steps: list[v2.Transform] = []
    if prep.annotations == "mask":
        steps.append(MaskAnnotations())
    if prep.crop == "content":
        steps.append(ContentCrop())
    if prep.resize == "pad":
        steps.append(PadToSquare())
    return steps


def _resize(prep: Preprocessing) -> v2.Resize:
    mode = v2.InterpolationMode(prep.interpolation)
    return v2.Resize((prep.image_size, prep.image_size), interpolation=mode, antialias=True)


def _to_normalized_tensor(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=False), v2.Normalize(prep.mean, prep.std)]


def build_decode_transform(prep: Preprocessing) -> v2.Compose:
    """The deterministic first part of every transform: PIL RGB image -> uint8 CHW tensor of
    ``image_size`` squared (what an in-memory cache of decoded images holds)."""
    return v2.Compose([*_geometry(prep), v2.PILToTensor(), _resize(prep)])


def build_normalize_transform(
    prep: Preprocessing, *, with_mask: bool = False
) -> v2.Compose | SplitMask:
    """uint8 tensor of :func:`build_decode_transform` -> normalized float tensor (with the
    lesion mask as a fourth channel: ``(image, mask)``, see :class:`SplitMask`)."""
    if with_mask:
        return SplitMask([], _to_normalized_tensor(prep))
    return v2.Compose(_to_normalized_tensor(prep))


def build_eval_transform(prep: Preprocessing) -> v2.Compose:
    """Deterministic PIL RGB image -> normalized CHW float tensor."""
    return v2.Compose([*build_decode_transform(prep).transforms, *_to_normalized_tensor(prep)])


class UltrasoundIntensity(v2.Transform):
    """Scanner-to-scanner variation of a B-mode image (uint8 or float tensor in 0..255, CHW).

    Each image draws: an overall gain (``gain``: factor in [1 - g, 1 + g]), a contrast change
    about the mean (``contrast``), a gamma (``gamma``: exponent in [1 - g, 1 + g]),
    multiplicative speckle (``speckle``: unit-mean gamma noise whose standard deviation is
    drawn up to this value), a blur / resolution loss (``blur``: Gaussian sigma drawn up to
    this, in pixels) and depth-dependent attenuation (``attenuation``: brightness falling
    linearly by up to this fraction from top to bottom) and an acoustic shadow (``shadow``: a
    vertical band of Gaussian profile, 5-20% of the width, darkening everything below a random
    depth by up to this fraction, as behind a calcification or rib; usaugment's
    GaussianShadow). A value of 0 turns a step off. The output is float32 in 0..255.
    """

    def __init__(
        self,
        *,
        gain: float = 0.0,
        contrast: float = 0.0,
        gamma: float = 0.0,
        speckle: float = 0.0,
        blur: float = 0.0,
        attenuation: float = 0.0,
        shadow: float = 0.0,
    ) -> None:
        super().__init__()
        self.gain, self.contrast, self.gamma = gain, contrast, gamma
        self.speckle, self.blur, self.attenuation = speckle, blur, attenuation
        self.shadow = shadow

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = image.float() / 255.0
        if self.blur:
            sigma = self._uniform(0.0, self.blur)
            if sigma > 0.3:
                x = v2.functional.gaussian_blur(x, [2 * math.ceil(2 * sigma) + 1] * 2, [sigma])
        if self.speckle:
            spread = self._uniform(0.0, self.speckle)
            if spread > 0:
                shape = 1.0 / spread**2  # gamma(k, 1/k): mean 1, standard deviation 1/sqrt(k)
                noise = torch.distributions.Gamma(shape, shape).sample(x.shape[1:])
                x = x * noise
        if self.attenuation:
            depth = torch.linspace(0, 1, x.shape[1])[:, None]
            x = x * (1 - self._uniform(0.0, self.attenuation) * depth)
        if self.shadow:
            x = x * (1 - self._uniform(0.0, self.shadow) * self._shadow_profile(*x.shape[1:]))
        if self.gamma:
            x = x.clamp(0, 1) ** self._uniform(1 - self.gamma, 1 + self.gamma)
        if self.contrast:
            mean = x.mean()
            x = (x - mean) * self._uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.gain:
            x = x * self._uniform(1 - self.gain, 1 + self.gain)
        x = torch.where(image == 0, 0.0, x)  # the black outside the scan stays black
        return (x.clamp(0, 1) * 255.0).to(torch.float32)


    def _shadow_profile(self, height: int, width: int) -> torch.Tensor:
        """Height x width in 0..1: a vertical band below a random depth, Gaussian across."""
        centre, spread = self._uniform(0, width), self._uniform(0.05, 0.2) * width / 2
        top = self._uniform(0.2, 0.8) * height
        across = torch.exp(-0.5 * ((torch.arange(width) - centre) / spread) ** 2)
        below = torch.sigmoid((torch.arange(height) - top) / (0.02 * height))
        return below[:, None] * across[None, :]


class SplitMask:
    """Run ``geometry`` on an RGB + mask (alpha) uint8 tensor, so that image and mask move
    together, then ``image_steps`` on the RGB channels alone: ``(image, mask)``, the mask as
    0/1 floats (thresholded at half, after bilinear resampling)."""

    def __init__(self, geometry: Sequence[Callable], image_steps: Sequence[Callable]) -> None:
        self.geometry, self.image_steps = list(geometry), list(image_steps)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for step in self.geometry:
            x = step(x)
        image = x[:3]
        for step in self.image_steps:
            image = step(image)
        return image, (x[3] >= 128).float()


def build_augment_transform(
    prep: Preprocessing, augment: AugmentConfig, *, with_mask: bool = False
) -> v2.Compose | SplitMask:
    """The random part of the training transform, on the uint8 tensor of
    :func:`build_decode_transform`: random rotation, shift, shear, zoom and horizontal flip, then
    ultrasound intensity changes when any is set (see :class:`UltrasoundIntensity`), then
    normalization. ``with_mask``: the tensor carries the lesion mask as a fourth channel, moved
    by the geometric steps only (see :class:`SplitMask`).

    Mirrors Keras' ImageDataGenerator(rotation_range, width/height_shift_range, shear_range,
    zoom_range, horizontal_flip) except that zoom is isotropic and the border is filled with
    black (ultrasound frames are black outside the scan) instead of repeating edge pixels.
    """
    geometry: list[v2.Transform] = [
        v2.RandomAffine(
            degrees=augment.rotation_degrees,
            translate=(augment.width_shift, augment.height_shift),
            scale=(1 - augment.zoom, 1 + augment.zoom),
            shear=augment.shear_degrees or None,
            interpolation=v2.InterpolationMode.BILINEAR,
        )
    ]
    if augment.horizontal_flip:
        geometry.append(v2.RandomHorizontalFlip())
    image_steps: list[v2.Transform] = []
    intensity = {name: getattr(augment, name) for name in INTENSITY_KEYS}
    if any(intensity.values()):
        image_steps.append(UltrasoundIntensity(**intensity))
    image_steps += _to_normalized_tensor(prep)
    if with_mask:
        return SplitMask(geometry, image_steps)
    return v2.Compose(geometry + image_steps)


def build_train_transform(prep: Preprocessing, augment: AugmentConfig) -> v2.Compose:
    """PIL RGB image -> augmented, normalized CHW float tensor: :func:`build_decode_transform`
    then :func:`build_augment_transform`."""
    return v2.Compose(
        [
            *build_decode_transform(prep).transforms,
            *build_augment_transform(prep, augment).transforms,
        ]
    )
