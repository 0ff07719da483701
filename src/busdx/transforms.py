"""Preprocessing and augmentation: the only place where pixels are turned into tensors.

Preprocessing belongs to the pretrained weights (see ``weights.py``): the VGG16 ImageNet weights
want Caffe-style input, ``x = rgb_0_255 - mean`` with no scaling by std. It is stored in every
model file, so evaluation, prediction and serving always match training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from busdx.config import AugmentConfig

__all__ = ["Preprocessing", "build_eval_transform", "build_train_transform"]


@dataclass(frozen=True)
class Preprocessing:
    """How an 8-bit RGB image becomes the network's input: resize, then ``(x - mean) / std``.

    ``mean`` and ``std`` are in 0..255 pixel units, per RGB channel.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

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
        )


def _resize(prep: Preprocessing) -> v2.Resize:
    mode = v2.InterpolationMode(prep.interpolation)
    return v2.Resize((prep.image_size, prep.image_size), interpolation=mode, antialias=True)


def _to_normalized_tensor(prep: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=False), v2.Normalize(prep.mean, prep.std)]


def build_eval_transform(prep: Preprocessing) -> v2.Compose:
    """Deterministic PIL RGB image -> normalized CHW float tensor."""
    return v2.Compose([v2.PILToTensor(), _resize(prep), *_to_normalized_tensor(prep)])


def build_train_transform(prep: Preprocessing, augment: AugmentConfig) -> v2.Compose:
    """Eval transform plus random rotation, shift, shear, zoom and horizontal flip.

    Mirrors Keras' ImageDataGenerator(rotation_range, width/height_shift_range, shear_range,
    zoom_range, horizontal_flip) except that zoom is isotropic and the border is filled with
    black (ultrasound frames are black outside the scan) instead of repeating edge pixels.
    """
    steps: list[v2.Transform] = [v2.PILToTensor(), _resize(prep)]
    steps.append(
        v2.RandomAffine(
            degrees=augment.rotation_degrees,
            translate=(augment.width_shift, augment.height_shift),
            scale=(1 - augment.zoom, 1 + augment.zoom),
            shear=augment.shear_degrees or None,
            interpolation=v2.InterpolationMode.BILINEAR,
        )
    )
    if augment.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized_tensor(prep))
