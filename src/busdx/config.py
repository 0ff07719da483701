"""Run configuration as data: typed sections, YAML files and ``key=value`` overrides.

Precedence is defaults < recipe < YAML file < command-line overrides. Unknown keys are an error,
so a typo never silently falls back to a default. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from busdx.devices import PRECISIONS
from busdx.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "list_recipes",
    "load_config",
]


POOLINGS = ("flatten", "avg", "avgmax", "multistage")  # model.pooling
CROPS = ("none", "content")  # data.crop
RESIZES = ("squash", "pad")  # data.resize
ANNOTATIONS = ("keep", "mask")  # data.annotations
REGIONS = ("image", "box")  # data.region


@dataclass
class ModelConfig:
    """Network: registered backbone, its pretrained weights and the classification head."""

    name: str = "vgg16"
    weights: str = "imagenet"  # "imagenet", "none" or a path to a state_dict file
    freeze_backbone: bool = True
    trainable_blocks: int = 0  # with a frozen backbone: its last blocks still trained
    pooling: str = "flatten"  # "flatten" (the recipe), "avg"/"avgmax" (global), "multistage"
    hidden_units: int = 512  # 0: a linear head
    dropout: float = 0.5


@dataclass
class DataConfig:
    """Which images are used, how they are split and how they are loaded."""

    classes: list[str] = field(default_factory=lambda: ["benign", "malignant"])
    positive_class: str = "malignant"
    include_normal: bool = False  # class-folder layout: count normal/ images as benign
    image_size: int = 224
    crop: str = "none"  # "content": crop to the B-mode field (drop black margins and UI)
    resize: str = "squash"  # "squash" (the recipe) or "pad" (keep the aspect ratio)
    annotations: str = "keep"  # "mask": paint over burned-in calipers, text and markers
    region: str = "image"  # "box": ROI mode, the model sees the lesion box only (see boxes.py)
    box_margin: float = 0.2  # ROI mode: box enlarged by this fraction of its side on each side
    boxes: str | None = None  # ROI mode: CSV of boxes (path,x,y,w,h); default: from lesion masks
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_file: str | None = None  # re-use a split.csv instead of drawing a new split
    group_duplicates: bool = True  # keep near-duplicate images in one split (see busdx audit)
    duplicate_distance: int = 10  # perceptual-hash bits (of 63) that still count as duplicate
    num_workers: int = -1  # loader worker processes; -1: auto (half the cores, max 8; 0 below 4)
    memory_cache_mb: int = 4096  # decode each image once into memory when they fit (0: off)


@dataclass
class AugmentConfig:
    """Training-time augmentation (the recipe's Keras ImageDataGenerator settings)."""

    rotation_degrees: float = 20.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    # Keras' ImageDataGenerator reads shear_range=0.2 as 0.2 *degrees*: kept for fidelity.
    shear_degrees: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    # Ultrasound-specific intensity changes (0 = off; see transforms.UltrasoundIntensity)
    gain: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    speckle: float = 0.0
    blur: float = 0.0
    attenuation: float = 0.0
    box_jitter: float = 0.1  # ROI mode: each box edge moves by up to this fraction of its side


@dataclass
class TrainConfig:
    """Optimisation loop."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" or "cosine" (decay to 0 over the epochs)
    early_stopping_patience: int = 0  # 0 disables early stopping
    feature_cache: bool = False  # frozen backbone only: train the head on cached features
    cache_views: int = 5  # augmented views per training image in the cache
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    precision: str = "fp32"  # "fp32", "bf16" (CUDA, or a CPU with avx512_bf16 / AMX), "fp16" (CUDA)
    # "uniform": each training image once per epoch; "balanced_sites": an epoch of as many draws,
    # with replacement, each site drawn equally often (a small hospital weighs as much as a big one)
    sampling: str = "uniform"


@dataclass
class EvaluateConfig:
    """Calibration, decision threshold and confidence intervals (all fitted on validation data)."""

    calibrate: bool = True  # temperature scaling
    threshold_policy: str = "target_sensitivity"  # "target_sensitivity", "youden" or "fixed"
    target_sensitivity: float = 0.95
    # > 0: the sensitivity's one-sided Clopper-Pearson lower bound at this confidence must
    # reach the target, not just its point estimate (needs many positives: see busdx cv)
    threshold_confidence: float = 0.0
    fixed_threshold: float = 0.5
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = 0


@dataclass
class Config:
    """Everything a run needs; saved as ``config.yaml`` in the run directory."""

    recipe: str = "vgg16-frozen"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check ranges and cross-field rules; return self for chaining."""
        checks = [
            (
                self.data.image_size >= 32 and self.data.image_size % 32 == 0,
                f"data.image_size must be a multiple of 32 and >= 32, got {self.data.image_size}",
            ),
            (
                0 <= self.data.val_fraction < 1
                and 0 <= self.data.test_fraction < 1
                and self.data.val_fraction + self.data.test_fraction < 1,
                "data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1",
            ),
            (
                len(self.data.classes) == 2 and len(set(self.data.classes)) == 2,
                f"data.classes must name two different classes, got {self.data.classes}",
            ),
            (
                self.data.classes[-1] == self.data.positive_class,
                f"data.positive_class ({self.data.positive_class!r}) must be the last of "
                f"data.classes ({self.data.classes}): list the negative class first",
            ),
            (
                self.data.crop in CROPS and self.data.resize in RESIZES,
                f"data.crop must be none or content and data.resize squash or pad, got "
                f"{self.data.crop!r} and {self.data.resize!r}",
            ),
            (
                self.data.annotations in ANNOTATIONS,
                f"data.annotations must be keep or mask, got {self.data.annotations!r}",
            ),
            (
                self.data.region in REGIONS
                and 0 <= self.data.box_margin <= 2
                and 0 <= self.augment.box_jitter < 1,
                f"data.region must be image or box (got {self.data.region!r}), "
                f"data.box_margin in [0, 2] and augment.box_jitter in [0, 1)",
            ),
            (
                self.data.region == "image"
                or (self.data.crop == "none" and not self.train.feature_cache),
                "data.region: box crops to the lesion box itself: use it with data.crop: none "
                "and train.feature_cache: false",
            ),
            (
                self.model.pooling in POOLINGS and self.model.hidden_units >= 0,
                f"model.pooling must be one of {', '.join(POOLINGS)} (got "
                f"{self.model.pooling!r}) and model.hidden_units >= 0 (0: a linear head)",
            ),
            (self.train.epochs >= 1, f"train.epochs must be >= 1, got {self.train.epochs}"),
            (
                self.train.batch_size >= 1,
                f"train.batch_size must be >= 1, got {self.train.batch_size}",
            ),
            (self.train.lr > 0, f"train.lr must be > 0, got {self.train.lr}"),
            (
                self.train.schedule in {"constant", "cosine"},
                f"train.schedule must be constant or cosine, got {self.train.schedule!r}",
            ),
            (
                not self.train.feature_cache
                or (self.model.freeze_backbone and self.model.weights != "none"),
                "train.feature_cache needs a frozen backbone with pretrained weights",
            ),
            (self.train.cache_views >= 1, "train.cache_views must be >= 1"),
            (
                self.train.sampling in {"uniform", "balanced_sites"},
                f"train.sampling must be uniform or balanced_sites, got {self.train.sampling!r}",
            ),
            (
                self.train.precision in PRECISIONS,
                f"train.precision must be fp32, bf16 or fp16, got {self.train.precision!r}",
            ),
            (
                self.data.num_workers >= -1 and self.data.memory_cache_mb >= 0,
                "data.num_workers must be >= 0 (or -1: auto) and data.memory_cache_mb >= 0",
            ),
            (
                0 <= self.model.dropout < 1,
                f"model.dropout must be in [0, 1), got {self.model.dropout}",
            ),
            (self.augment.zoom < 1, f"augment.zoom must be < 1, got {self.augment.zoom}"),
            (
                self.evaluate.threshold_policy in {"target_sensitivity", "youden", "fixed"},
                "evaluate.threshold_policy must be target_sensitivity, youden or fixed, got "
                f"{self.evaluate.threshold_policy!r}",
            ),
            (
                0 < self.evaluate.target_sensitivity <= 1
                and 0 < self.evaluate.ci_level < 1
                and 0 <= self.evaluate.threshold_confidence < 1,
                "evaluate.target_sensitivity must be in (0, 1], evaluate.ci_level in (0, 1) and "
                "evaluate.threshold_confidence in [0, 1)",
            ),
            (
                self.evaluate.n_bootstrap >= 100,
                f"evaluate.n_bootstrap must be >= 100, got {self.evaluate.n_bootstrap}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Convert ``value`` to the field's declared type, or raise ConfigError."""
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation == "str":
        return str(value)
    if annotation == "str | None":
        return None if value is None else str(value)
    if annotation == "list[str]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{key} must be a list of names, got {value!r}")
    raise AssertionError(f"unhandled config type {annotation} for {key}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}.{suggestion}")


def _update_section(section: Any, values: dict[str, Any], prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, sorted(fields))
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {value!r}")
            _update_section(current, value, f"{key}.")
        else:
            setattr(section, name, _coerce(value, str(fields[name].type), key))


def config_from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Return ``base`` (default: the built-in defaults) updated with a nested dict."""
    config = _copy(base) if base is not None else Config()
    _update_section(config, values or {}, "")
    return config.validate()


def _copy(config: Config) -> Config:
    """Deep copy of a config through its dict form."""
    copy = Config()
    _update_section(copy, config.to_dict(), "")
    return copy


def list_recipes() -> list[str]:
    """Names of the built-in recipes (YAML files shipped in ``busdx/configs``)."""
    folder = resources.files("busdx") / "configs"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}".splitlines()[0]) from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must hold a mapping of config sections")
    return values


def load_config(path: str | Path | None = None, *, recipe: str | None = None) -> Config:
    """Build a config from a recipe name and/or a YAML file.

    The file may name its recipe with ``recipe: NAME``; the recipe's values are applied first,
    then the file's. Without either, the default recipe ``vgg16-frozen`` is used.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        file_values = _read_yaml(path.read_text(encoding="utf-8"), str(path))
    name = recipe or file_values.get("recipe") or Config.recipe
    if name not in list_recipes():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(list_recipes())}")
    recipe_text = (resources.files("busdx") / "configs" / f"{name}.yaml").read_text("utf-8")
    config = config_from_dict(_read_yaml(recipe_text, f"recipe {name}"))
    config = config_from_dict(file_values, base=config)
    config.recipe = name
    return config


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars or lists)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        target = values
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _read_scalar(raw, item)
    return config_from_dict(values, base=config)


def _read_scalar(raw: str, item: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value in override {item!r}") from exc
