"""Training's transforms: the deterministic step as a torch transform, augmentation, and
normalization into tensors.

The deterministic step is :func:`busdx.data.preprocess.prepare` (NumPy and Pillow), the very
function inference runs without torch; :func:`build_eval_transform` adds the same
normalization as :func:`busdx.data.preprocess.normalize`, on tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from busdx.config import AugmentConfig
from busdx.data.preprocess import Preprocessing, mask_annotations, prepare

__all__ = [
    "MaskAnnotations",
    "Prepare",
    "SplitMask",
    "UltrasoundIntensity",
    "build_augment_transform",
    "build_decode_transform",
    "build_eval_transform",
    "build_normalize_transform",
    "build_train_transform",
]

INTENSITY_KEYS = ("gain", "contrast", "gamma", "speckle", "blur", "attenuation", "shadow")


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


class Prepare(v2.Transform):
    """:func:`busdx.data.preprocess.prepare` as a transform: PIL image -> uint8 CHW tensor of
    ``image_size`` squared, annotations painted by a :class:`MaskAnnotations` that remembers."""

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        self.prep = prep
        self.paint = MaskAnnotations() if prep.annotations == "mask" else mask_annotations

    def forward(self, image: Image.Image) -> torch.Tensor:  # type: ignore[override]
        return torch.from_numpy(prepare(image, self.prep, paint=self.paint)).permute(2, 0, 1)


def _to_normalized_tensor(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=False), v2.Normalize(prep.mean, prep.std)]


def build_decode_transform(prep: Preprocessing) -> v2.Compose:
    """The deterministic first part of every transform: PIL RGB image -> uint8 CHW tensor of
    ``image_size`` squared (what an in-memory cache of decoded images holds)."""
    return v2.Compose([Prepare(prep)])


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
