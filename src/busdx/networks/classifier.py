"""Model registry and the binary classifier: a (frozen) pretrained backbone plus a dense head.

Backbones register themselves with :func:`register_backbone`; :func:`create_model` builds the
backbone, loads its pretrained weights, freezes it if asked, and adds the recipe's head
(Flatten -> Linear hidden_units + ReLU -> Dropout -> Linear 1). The model returns one logit per
image: the log-odds that it is of the positive class (malignant).
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import vgg16 as tv_vgg16

from busdx.config import POOLINGS, ModelConfig
from busdx.data.preprocess import Preprocessing
from busdx.errors import ConfigError, UnknownModelError, WeightsError
from busdx.fileio import sha256_file
from busdx.networks.decoders import MaskDecoder, UNetDecoder, build_decoder
from busdx.networks.weights import get_weight_spec, load_state_dict, resolve_weights_file

__all__ = [
    "BinaryClassifier",
    "Ensemble",
    "Segmented",
    "WeightsInfo",
    "block_starts",
    "create_model",
    "list_models",
    "register_backbone",
]

StateDict = dict[str, torch.Tensor]
_BACKBONES: dict[str, Callable[[], nn.Module]] = {}
_WEIGHT_ADAPTERS: dict[str, Callable[[StateDict], StateDict]] = {}


def register_backbone(
    name: str, *, adapt_weights: Callable[[StateDict], StateDict] | None = None
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register a function that builds a feature extractor (N,3,H,W) -> (N,C,h,w).

    The extractor is an ``nn.Sequential`` split into blocks, so that ``model.trainable_blocks``
    can leave the last blocks trainable: blocks end with a max-pool layer, or the builder lists
    the first layer of each block in a ``block_starts`` attribute. A ``feature_taps`` attribute
    lists the layers whose outputs ``model.pooling: multistage`` pools beside the last one.
    ``adapt_weights`` renames the keys of a pretrained weights file into the extractor's layout.
    """

    def decorator(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _BACKBONES[name] = builder
        if adapt_weights is not None:
            _WEIGHT_ADAPTERS[name] = adapt_weights
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_BACKBONES)


@register_backbone("vgg16")
def vgg16_features() -> nn.Module:
    """VGG16's 13 conv layers and 5 max-pools (torchvision key layout); output stride 32."""
    features = tv_vgg16(weights=None).features
    features.feature_taps = (16, 23)  # after pool3 and pool4, for multistage pooling
    features.mask_taps = (9, 16, 23)  # after pool2, pool3 and pool4 (strides 4, 8, 16)
    features.stride2_tap = 4  # after pool1: the U-Net decoder's finest skip
    return features


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (asymmetric for stride 2), as the Lite weights
    were trained with: pad so that the output is ``ceil(input / stride)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-1:-3:-1], self.kernel_size[::-1],
                                        self.stride[::-1], strict=True):  # fmt: skip
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = SameConv2d(cin, cout, kernel, stride=stride, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite): 1x1 expand,
    depthwise kxk, 1x1 project, with a residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(*_conv_bn(cin, hidden, 1), nn.ReLU6()) if expand != 1 else None
        self.depthwise = nn.Sequential(
            *_conv_bn(hidden, hidden, kernel, stride, groups=hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(*_conv_bn(hidden, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(x if self.expand is None else self.expand(x)))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand, out channels) of each EfficientNet-Lite's seven stages. Lite
# keeps the stem (32), the first and last stages' repeats and the head (1280) fixed; Lite1 and
# Lite2 add depth, Lite2 width too (Tan & Le 2019, lite).
_LITE_STAGES = {
    0: [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)],
    1: [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
        (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320)],
    2: [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)],
}  # fmt: skip

_LITE_RENAMES = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}
_LITE_TOP = {"_conv_stem": "0.0", "_bn0": "0.1", "_conv_head": "8", "_bn1": "9"}


def lite_state_dict_adapter(variant: int) -> Callable[[StateDict], StateDict]:
    """A function mapping ``efficientnet_pytorch`` key names (``_blocks.N._expand_conv``...) of
    EfficientNet-Lite``variant`` to this layout; the ImageNet classifier (``_fc``) is dropped."""
    stage_of = [
        (stage, index)
        for stage, (repeats, *_rest) in enumerate(_LITE_STAGES[variant], start=1)
        for index in range(repeats)
    ]

    def adapt(state: StateDict) -> StateDict:
        out = {}
        for key, tensor in state.items():
            parts = key.split(".")
            if parts[0] == "_blocks":
                stage, index = stage_of[int(parts[1])]
                out[f"{stage}.{index}.{_LITE_RENAMES[parts[2]]}.{'.'.join(parts[3:])}"] = tensor
            elif parts[0] in _LITE_TOP:
                out[f"{_LITE_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = tensor
        return out

    return adapt


def efficientnet_lite_features(variant: int) -> nn.Sequential:
    """EfficientNet-Lite``variant`` (Tan & Le 2019; ReLU6, no squeeze-excite): stem, seven
    stages and the 1x1 head conv to 1280 channels; output stride 32. Blocks: stem + stages 1-2,
    then stages 3, 4, 5-6 and 7 + head, so ``trainable_blocks`` cuts where the resolution drops."""
    layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, 2), nn.ReLU6())]
    cin = 32
    for repeats, kernel, stride, expand, cout in _LITE_STAGES[variant]:
        blocks = []
        for index in range(repeats):
            blocks.append(MBConv(cin, cout, kernel, stride if index == 0 else 1, expand))
            cin = cout
        layers.append(nn.Sequential(*blocks))
    layers += [*_conv_bn(cin, 1280, 1), nn.ReLU6()]
    backbone = nn.Sequential(*layers)
    backbone.block_starts = [0, 3, 4, 5, 7]
    backbone.feature_taps = (5, 6)  # stages 5 and 6 for multistage pooling
    backbone.mask_taps = (2, 3, 5)  # stages 2, 3 and 5 (strides 4, 8, 16)
    backbone.stride2_tap = 1  # stage 1: the U-Net decoder's finest skip
    return backbone


for _variant in _LITE_STAGES:
    register_backbone(
        f"efficientnet_lite{_variant}", adapt_weights=lite_state_dict_adapter(_variant)
    )(functools.partial(efficientnet_lite_features, _variant))


@dataclass(frozen=True)
class WeightsInfo:
    """Where the backbone's initial weights came from, and what input they expect."""

    name: str  # "imagenet", "none" or a file path
    sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class GlobalPool(nn.Module):
    """Global average (``avg``) or concatenated average and max (``avgmax``) pooling."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return torch.cat([pooled, x.amax(dim=(2, 3))], dim=1) if self.mode == "avgmax" else pooled


def _head(n_features: int, pooling: str, hidden_units: int, dropout: float) -> nn.Sequential:
    pools = {"flatten": nn.Flatten(), "multistage": nn.Identity()}  # multistage: pooled already
    pool = pools.get(pooling) or GlobalPool(pooling)
    if hidden_units == 0:  # a linear model of the (pooled) features
        return nn.Sequential(pool, nn.Dropout(dropout), nn.Linear(n_features, 1))
    return nn.Sequential(
        pool,
        nn.Linear(n_features, hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_units, 1),
    )


class Segmented(NamedTuple):
    """What :meth:`BinaryClassifier.segment` returns for a batch."""

    logits: torch.Tensor  # N: log-odds of the positive class
    masks: torch.Tensor  # N x H x W: lesion-mask logits at the input's size
    features: torch.Tensor  # N x C: the last feature maps, pooled (the scope guard's input)


class BinaryClassifier(nn.Module):
    """``backbone`` -> pooling -> head -> one logit.

    The recipe's head is Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear(1); ``pooling``
    ``avg`` or ``avgmax`` pools each feature map to one value first (512 or 1280 inputs instead
    of 25,088), ``multistage`` concatenates the global averages of the last feature map and of
    the backbone's ``feature_taps`` (earlier, finer stages), and ``hidden_units=0`` makes the
    head linear (Dropout -> Linear(1)).

    The backbone may be frozen up to a layer (``freeze_backbone``): its frozen layers are the
    *stem*, whose output (``stem``) does not change during training and can be cached, and
    ``from_stem`` runs the trainable layers and the head on it.

    With ``mask_head`` a decoder (:class:`MaskDecoder`, or :class:`UNetDecoder` with
    ``mask_decoder="unet"``) on the backbone's ``mask_taps`` and last map also outlines the
    lesion (:meth:`segment`); ``forward`` still returns the logit alone.
    """

    def __init__(
        self,
        backbone: nn.Sequential,
        *,
        image_size: int,
        hidden_units: int,
        dropout: float,
        pooling: str = "flatten",
        mask_head: bool = False,
        mask_decoder: str = "fpn",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(
                f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}"
            )
        self.backbone = backbone
        self.taps = tuple(getattr(backbone, "feature_taps", ())) if pooling == "multistage" else ()
        if pooling == "multistage" and not self.taps:
            raise ConfigError("model.pooling multistage needs a backbone with feature_taps")
        with torch.no_grad():
            backbone.eval()
            maps, tapped = self.run_backbone(torch.zeros(1, 3, image_size, image_size))
        n_features = {
            "flatten": maps[0].numel(),
            "avg": maps.shape[1],
            "avgmax": 2 * maps.shape[1],
            "multistage": maps.shape[1] + sum(t.shape[1] for t in tapped),
        }[pooling]
        self.head = _head(n_features, pooling, hidden_units, dropout)
        self.stem_layers = 0  # backbone layers frozen
        self.mask_taps: tuple[int, ...] = ()
        self.mask_decoder: MaskDecoder | UNetDecoder | None = None
        if mask_head:
            stride2 = (backbone.stride2_tap,) if mask_decoder == "unet" else ()
            self.mask_taps = stride2 + tuple(backbone.mask_taps)
            with torch.no_grad():
                _, fine = self.run_backbone(torch.zeros(1, 3, 64, 64), taps=self.mask_taps)
            channels = [m.shape[1] for m in fine] + [maps.shape[1]]
            self.mask_decoder = build_decoder(mask_decoder, channels)

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
        stem_layers = starts[-trainable_blocks] if trainable_blocks else len(self.backbone)
        if self.mask_decoder is not None:
            raise ConfigError(
                "model.mask_head learns with the backbone: set model.freeze_backbone false"
            )
        if self.taps and min(self.taps) < stem_layers:
            raise ConfigError(
                "model.pooling multistage pools layers inside the frozen part of the backbone; "
                "raise model.trainable_blocks or set model.freeze_backbone false"
            )
        self.stem_layers = stem_layers
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

    def run_backbone(
        self, x: torch.Tensor, start: int = 0, stop: int | None = None,
        taps: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Backbone layers ``start`` to ``stop`` (default: the end) on ``x``: their output, and
        the outputs of the tapped layers among them (default: those of multistage pooling)."""
        taps = self.taps if taps is None else taps
        tapped = []
        for index in range(start, len(self.backbone) if stop is None else stop):
            x = self.backbone[index](x)
            if index in taps:
                tapped.append(x)
        return x, tapped

    def classify(self, maps: torch.Tensor, tapped: list[torch.Tensor]) -> torch.Tensor:
        """Pooling and head on the last feature maps (and the tapped ones): one logit each."""
        if self.taps:
            maps = torch.cat([m.mean(dim=(2, 3)) for m in (*tapped, maps)], dim=1)
        return self.head(maps).squeeze(1)

    def from_stem(self, stem_output: torch.Tensor) -> torch.Tensor:
        """Trainable backbone layers and head: stem output -> one logit per image."""
        return self.classify(*self.run_backbone(stem_output, self.stem_layers))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the whole backbone."""
        return self.run_backbone(self.stem(images), self.stem_layers)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_stem(self.stem(images))

    def segment(self, images: torch.Tensor) -> Segmented:
        """The class logit, the lesion-mask logits (N x H x W, the input's size) and the pooled
        features of each image, from one pass of the backbone (a model with ``mask_head``)."""
        if self.mask_decoder is None:
            raise ConfigError("this model has no mask head (model.mask_head: true trains one)")
        taps = tuple(sorted({*self.taps, *self.mask_taps}))
        maps, tapped = self.run_backbone(self.stem(images), taps=taps)
        by_index = dict(zip(taps, tapped, strict=True))
        logits = self.classify(maps, [by_index[i] for i in self.taps])
        fine = [by_index[i] for i in self.mask_taps]
        masks = self.mask_decoder([*fine, maps], images.shape[-2:])
        return Segmented(logits, masks, maps.float().mean(dim=(2, 3)))


class Ensemble(nn.Module):
    """Classifiers of one architecture (e.g. the fold models of a cross-validation) whose logit
    is the mean of theirs."""

    def __init__(self, members: list[BinaryClassifier]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(dim=0)


def block_starts(backbone: nn.Sequential) -> list[int]:
    """Index of the first layer of each block (listed by the builder, or after each max-pool)."""
    if hasattr(backbone, "block_starts"):
        return list(backbone.block_starts)
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
    if arch in _WEIGHT_ADAPTERS and weights == "imagenet":
        state = _WEIGHT_ADAPTERS[arch](state)
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
        backbone,
        image_size=image_size,
        hidden_units=config.hidden_units,
        dropout=config.dropout,
        pooling=config.pooling,
        mask_head=config.mask_head,
        mask_decoder=config.mask_decoder,
    )
    if config.freeze_backbone:
        model.freeze_backbone(config.trainable_blocks)
    return model, info, Preprocessing(image_size=image_size, mean=info.mean, std=info.std)
