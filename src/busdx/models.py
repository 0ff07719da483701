"""Model registry and the binary classifier: a (frozen) pretrained backbone plus a dense head.

Backbones register themselves with :func:`register_backbone`; :func:`create_model` builds the
backbone, loads its pretrained weights, freezes it if asked, and adds the recipe's head
(Flatten -> Linear hidden_units + ReLU -> Dropout -> Linear 1). The model returns one logit per
image: the log-odds that it is of the positive class (malignant).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg16 as tv_vgg16

from busdx.config import ModelConfig
from busdx.errors import ConfigError, UnknownModelError, WeightsError
from busdx.fileio import sha256_file
from busdx.transforms import Preprocessing
from busdx.weights import get_weight_spec, load_state_dict, resolve_weights_file

__all__ = [
    "BinaryClassifier",
    "WeightsInfo",
    "block_starts",
    "create_model",
    "list_models",
    "register_backbone",
]

_BACKBONES: dict[str, Callable[[], nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register a function that builds a feature extractor (N,3,H,W) -> (N,C,h,w).

    The extractor is an ``nn.Sequential`` whose blocks each end with a max-pool layer, so that
    ``model.trainable_blocks`` can leave the last blocks trainable.
    """

    def decorator(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _BACKBONES[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_BACKBONES)


@register_backbone("vgg16")
def vgg16_features() -> nn.Module:
    """VGG16's 13 conv layers and 5 max-pools (torchvision key layout); output stride 32."""
    return tv_vgg16(weights=None).features


@dataclass(frozen=True)
class WeightsInfo:
    """Where the backbone's initial weights came from, and what input they expect."""

    name: str  # "imagenet", "none" or a file path
    sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class BinaryClassifier(nn.Module):
    """``backbone`` -> Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear(1) logit.

    The backbone may be frozen up to a layer (``freeze_backbone``): its frozen layers are the
    *stem*, whose output (``stem``) does not change during training and can be cached, and
    ``from_stem`` runs the trainable layers and the head on it.
    """

    def __init__(
        self, backbone: nn.Sequential, *, image_size: int, hidden_units: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            feature_shape = backbone(torch.zeros(1, 3, image_size, image_size)).shape[1:]
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(feature_shape.numel(), hidden_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_units, 1),
        )
        self.stem_layers = 0  # backbone layers frozen

    @property
    def backbone_frozen(self) -> bool:
        """Whether part of the backbone is frozen (its output can then be cached)."""
        return self.stem_layers > 0

    def freeze_backbone(self, trainable_blocks: int = 0) -> None:
        """Freeze the backbone except its last ``trainable_blocks`` blocks (kept in eval mode)."""
        starts = block_starts(self.backbone)
        if not 0 <= trainable_blocks < len(starts):
            raise ConfigError(
                f"model.trainable_blocks must be between 0 and {len(starts) - 1} for this "
                f"backbone, got {trainable_blocks}"
            )
        self.stem_layers = starts[-trainable_blocks] if trainable_blocks else len(self.backbone)
        self.backbone.requires_grad_(True)
        self.backbone[: self.stem_layers].requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> BinaryClassifier:
        super().train(mode)
        self.backbone[: self.stem_layers].eval()
        if self.stem_layers == len(self.backbone):
            self.backbone.eval()
        return self

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the frozen backbone layers; no autograd graph is built for them."""
        images = images.contiguous(memory_format=torch.channels_last)  # ~1.4x faster on CPU
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return self.backbone[: self.stem_layers](images)

    def from_stem(self, stem_output: torch.Tensor) -> torch.Tensor:
        """Trainable backbone layers and head: stem output -> one logit per image."""
        return self.head(self.backbone[self.stem_layers :](stem_output)).squeeze(1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the whole backbone."""
        return self.backbone[self.stem_layers :](self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_stem(self.stem(images))


def block_starts(backbone: nn.Sequential) -> list[int]:
    """Index of the first layer of each block (blocks end with a max-pool layer)."""
    ends = [i + 1 for i, layer in enumerate(backbone) if isinstance(layer, nn.MaxPool2d)]
    return [0, *(end for end in ends if end < len(backbone))]


def _initial_weights(backbone: nn.Module, arch: str, weights: str) -> WeightsInfo:
    if weights == "none":
        spec = get_weight_spec(arch, "imagenet")  # keep the input convention of the family
        return WeightsInfo("none", None, spec.mean, spec.std)
    if weights == "imagenet":
        spec = get_weight_spec(arch, "imagenet")
        path = resolve_weights_file(spec)
    else:
        spec = get_weight_spec(arch, "imagenet")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"--weights {weights!r} is neither 'imagenet', 'none' nor an existing file"
            )
    digest = sha256_file(path)
    state = load_state_dict(path)
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit the {arch} backbone: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return WeightsInfo(weights, digest, spec.mean, spec.std)


def create_model(
    config: ModelConfig, *, image_size: int, load_weights: bool = True
) -> tuple[BinaryClassifier, WeightsInfo, Preprocessing]:
    """Build the classifier described by ``config``.

    Returns the model, where its backbone weights came from, and the preprocessing those
    weights expect. With ``load_weights=False`` the backbone stays randomly initialised (used
    when a trained model file is about to be loaded over it).
    """
    if config.name not in _BACKBONES:
        close = difflib.get_close_matches(config.name, list_models(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"unknown model {config.name!r}; available: {', '.join(list_models())}.{hint}"
        )
    backbone = _BACKBONES[config.name]().to(memory_format=torch.channels_last)
    info = _initial_weights(backbone, config.name, config.weights if load_weights else "none")
    model = BinaryClassifier(
        backbone, image_size=image_size, hidden_units=config.hidden_units, dropout=config.dropout
    )
    if config.freeze_backbone:
        model.freeze_backbone(config.trainable_blocks)
    return model, info, Preprocessing(image_size=image_size, mean=info.mean, std=info.std)
