"""Run configuration as data: typed sections (pydantic models), YAML files and ``key=value``
overrides.

Precedence is defaults < recipe < YAML file < command-line overrides. Each default is written
once, in the models below (they are the classic recipe). Unknown keys are an error with a
suggestion, so a typo never silently falls back to a default; ``--set section.key=value``
reaches every key. The resolved config is saved with every run.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from busdx.errors import ConfigError
from busdx.hardware import PRECISIONS

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
MASK_DECODERS = ("fpn", "unet")  # model.mask_decoder
CROPS = ("none", "content")  # data.crop
RESIZES = ("squash", "pad")  # data.resize
ANNOTATIONS = ("keep", "mask")  # data.annotations
REGIONS = ("image", "box")  # data.region


class _Section(BaseModel):
    """A config section: unknown keys are errors; numbers given for text become text."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelConfig(_Section):
    """Network: registered backbone, its pretrained weights and the classification head."""

    name: str = "vgg16"
    weights: str = Field("imagenet", description='"imagenet", "none" or a state_dict file')
    freeze_backbone: bool = True
    trainable_blocks: int = Field(0, description="frozen backbone: its last blocks trained")
    pooling: Literal[POOLINGS] = Field(  # type: ignore[valid-type]
        "flatten", description='"flatten" (the recipe), "avg"/"avgmax" (global), "multistage"'
    )
    hidden_units: int = Field(512, ge=0, description="0: a linear head")
    dropout: float = Field(0.5, ge=0, lt=1)
    mask_head: bool = Field(
        False, description="also outline the lesion: a mask head on the backbone (multi-task)"
    )
    mask_decoder: Literal[MASK_DECODERS] = Field(  # type: ignore[valid-type]
        "fpn", description='mask head: "fpn" (feature pyramid, stride 4) or "unet" (stride 2)'
    )


class DataConfig(_Section):
    """Which images are used, how they are split and how they are loaded."""

    classes: list[str] = Field(default_factory=lambda: ["benign", "malignant"])
    positive_class: str = "malignant"
    include_normal: bool = Field(False, description="class folders: normal/ counted as benign")
    image_size: int = Field(224, ge=32, multiple_of=32)
    crop: Literal[CROPS] = Field(  # type: ignore[valid-type]
        "none", description='"content": crop to the B-mode field (drop black margins and UI)'
    )
    resize: Literal[RESIZES] = Field(  # type: ignore[valid-type]
        "squash", description='"squash" (the recipe) or "pad" (keep the aspect ratio)'
    )
    annotations: Literal[ANNOTATIONS] = Field(  # type: ignore[valid-type]
        "keep", description='"mask": paint over burned-in calipers, text and markers'
    )
    region: Literal[REGIONS] = Field(  # type: ignore[valid-type]
        "image", description='"box": ROI mode, the model sees the lesion box only'
    )
    box_margin: float = Field(0.2, ge=0, le=2, description="ROI: box enlarged by this fraction")
    boxes: str | None = Field(None, description="ROI: CSV of boxes; default: from lesion masks")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    split_file: str | None = Field(None, description="re-use a split.csv")
    group_duplicates: bool = Field(True, description="near-duplicate images share a split")
    duplicate_distance: int = Field(10, ge=0, le=63, description="perceptual-hash bits")
    num_workers: int = Field(-1, description="loader processes; -1: auto")
    memory_cache_mb: int = Field(4096, ge=0, description="decode images once into memory")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value < -1:
            raise ValueError("data.num_workers must be >= 0 (or -1: auto)")
        return value


class AugmentConfig(_Section):
    """Training-time augmentation (the recipe's Keras ImageDataGenerator settings)."""

    rotation_degrees: float = 20.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    shear_degrees: float = Field(0.2, description="Keras reads shear_range=0.2 as 0.2 degrees")
    zoom: float = Field(0.2, lt=1)
    horizontal_flip: bool = True
    # ultrasound-specific intensity changes (0 = off; see transforms.UltrasoundIntensity)
    gain: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    speckle: float = 0.0
    blur: float = 0.0
    attenuation: float = 0.0
    shadow: float = 0.0
    box_jitter: float = Field(0.1, ge=0, lt=1, description="ROI: box edges move by this much")


class TrainConfig(_Section):
    """Optimisation loop."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    early_stopping_patience: int = Field(0, ge=0, description="0 disables early stopping")
    feature_cache: bool = Field(False, description="frozen backbone: train on cached features")
    cache_views: int = Field(5, ge=1, description="augmented views per image in the cache")
    mask_weight: float = Field(1.0, ge=0, description="mask head: weight of its loss")
    mask_boundary_weight: float = Field(
        0.0, ge=0, description="mask head: extra weight of the pixel loss within 3 px of the "
        "reader's outline (0: off)",
    )  # fmt: skip
    decoder_lr_scale: float = Field(
        1.0, gt=0, description="mask head: its decoder, trained from scratch, learns at lr "
        "times this",
    )  # fmt: skip
    keep: Literal["best_val_loss", "last"] = Field(
        "best_val_loss", description="which epoch's weights become model.pt: the lowest "
        "validation loss, or the last epoch's (a fixed schedule, as torchvision's references)",
    )  # fmt: skip
    ema_epochs: float = Field(
        0.0, ge=0, description="weights averaged over about this many epochs (EMA) are "
        "validated and saved; 0: off",
    )  # fmt: skip
    seed: int = 42
    device: str = Field("auto", description='"auto", "cpu", "cuda", "cuda:1", ...')
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0: torch's default")
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "fp32", description="bf16: CUDA or a CPU with avx512_bf16 / AMX; fp16: CUDA"
    )
    sampling: Literal["uniform", "balanced_sites"] = Field(
        "uniform",
        description="balanced_sites: each site drawn equally often, with replacement",
    )


class EvaluateConfig(_Section):
    """Calibration, decision threshold and confidence intervals (all fitted on validation data)."""

    calibrate: bool = Field(True, description="temperature scaling")
    threshold_policy: Literal["target_sensitivity", "youden", "fixed"] = "target_sensitivity"
    target_sensitivity: float = Field(0.95, gt=0, le=1)
    threshold_confidence: float = Field(
        0.0, ge=0, lt=1,
        description="> 0: the sensitivity's one-sided Clopper-Pearson lower bound at this "
        "confidence must reach the target (needs many positives: see busdx cv)",
    )  # fmt: skip
    fixed_threshold: float = Field(0.5, ge=0, le=1)
    n_bootstrap: int = Field(1000, ge=100)
    ci_level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class Config(_Section):
    """Everything a run needs; saved as ``config.yaml`` in the run directory.

    The defaults below are the classic recipe ``vgg16-frozen``; every other recipe is a YAML
    file of the values it changes (``busdx/configs``).
    """

    recipe: str = "vgg16-frozen"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """Rules that tie two settings together."""
        data, train = self.data, self.train
        rules = [
            (data.val_fraction + data.test_fraction < 1,
             "data.val_fraction and data.test_fraction must sum to less than 1"),
            (len(data.classes) == 2 and len(set(data.classes)) == 2,
             f"data.classes must name two different classes, got {data.classes}"),
            (data.classes[-1] == data.positive_class,
             f"data.positive_class ({data.positive_class!r}) must be the last of "
             f"data.classes ({data.classes}): list the negative class first"),
            (data.region == "image" or (data.crop == "none" and not train.feature_cache),
             "data.region: box crops to the lesion box itself: use it with data.crop: none "
             "and train.feature_cache: false"),
            (not train.feature_cache
             or (self.model.freeze_backbone and self.model.weights != "none"),
             "train.feature_cache needs a frozen backbone with pretrained weights"),
        ]  # fmt: skip
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and checkpoint-safe)."""
        return self.model_dump()


KEYS = {  # every key that --set reaches, by section: the fields of each section's model
    name: list(section.model_fields)
    for name, section in (("model", ModelConfig), ("data", DataConfig), ("augment", AugmentConfig),
                          ("train", TrainConfig), ("evaluate", EvaluateConfig))
}  # fmt: skip


def _problem(error: dict[str, Any]) -> str:
    """One pydantic error as a sentence that names the key and what it must be."""
    key = ".".join(str(part) for part in error["loc"])
    given, kind, ctx = error.get("input"), error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        section, _, name = key.rpartition(".")
        valid = KEYS.get(section, list(Config.model_fields))
        hint = difflib.get_close_matches(name, valid, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        return f"unknown config key {key!r}; valid keys: {', '.join(valid)}.{suggestion}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "float_type": "a number",
        "float_parsing": "a number",
        "greater_than_equal": f">= {ctx.get('ge')}",
        "greater_than": f"> {ctx.get('gt')}",
        "less_than": f"< {ctx.get('lt')}",
        "less_than_equal": f"<= {ctx.get('le')}",
        "multiple_of": f"a multiple of {ctx.get('multiple_of')}",
        "literal_error": str(ctx.get("expected", "")).replace("'", ""),
        "list_type": "a list",
        "string_type": "text",
        "model_type": "a mapping",
        "dict_type": "a mapping",
    }.get(kind)
    if expected is None:
        return f"{key}: {error['msg']}"
    return f"{key} must be {expected}, got {given!r}"


def config_from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    """Return ``base`` (default: the built-in defaults) updated with a nested dict; any
    problem is a :class:`ConfigError` naming the key."""
    merged = _merge(base.to_dict() if base is not None else {}, values or {})
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_problem(exc.errors()[0])) from None


def _merge(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``values`` laid over it, section by section."""
    merged = dict(base)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
    name = recipe or file_values.get("recipe") or Config.model_fields["recipe"].default
    if name not in list_recipes():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(list_recipes())}")
    recipe_text = (resources.files("busdx") / "configs" / f"{name}.yaml").read_text("utf-8")
    config = config_from_dict(_read_yaml(recipe_text, f"recipe {name}"))
    return config_from_dict({**file_values, "recipe": name}, base=config)


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
