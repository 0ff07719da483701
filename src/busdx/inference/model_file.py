"""What a model file carries, typed: one schema for ``model.pt`` and the metadata of its ONNX
exports, written and read here and nowhere else.

A model file is its tensors (``state_dict``; the out-of-scope guard's ``mean`` and
``precision`` in ``scope_arrays``) and a :class:`ModelInfo`: preprocessing, class names, the
decision threshold, how probabilities were calibrated and on what (:class:`Calibration`), the
out-of-scope guard's settings (:class:`ScopeGuard`), the network (its ``model`` config, whether
it outlines) and where it came from (:class:`Provenance`). Files of format version 1 (busdx
0.1 to 0.3) hold all of it as flat keys; :func:`read_info` migrates them on read, so every
model file written since busdx 0.1 still loads.

``model.pt`` is read with ``torch.load(..., weights_only=True)`` (an untrusted file runs no
code); this module imports torch only when it reads or writes one, so inference without torch
can read an ONNX export's metadata through :func:`read_info`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from busdx import __version__
from busdx.config import Config
from busdx.data.preprocess import Preprocessing
from busdx.errors import CheckpointError
from busdx.fileio import atomic_path
from busdx.provenance import environment
from busdx.stats.calibration import Calibration

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ONNX_METADATA_KEY",
    "Calibration",
    "ModelInfo",
    "Provenance",
    "ScopeGuard",
    "info_json",
    "read_info",
    "read_model_file",
    "update_model_file",
    "write_model_file",
]

FORMAT = "busdx-model"
FORMAT_VERSION = 2  # 1: flat keys (busdx <= 0.3); 2: {"info": ModelInfo, tensors beside it}
ONNX_METADATA_KEY = "busdx"  # an ONNX export's metadata_props entry holding :func:`info_json`
# version 1's flat calibration keys -> Calibration's fields
_V1_CALIBRATION = {
    "temperature": "temperature", "threshold_policy": "threshold_policy",
    "target_sensitivity": "target_sensitivity", "threshold_confidence": "threshold_confidence",
    "operating_points": "operating_points", "sensitivity_promise": "sensitivity_promise",
    "calibration_cases": "cases", "validation_ece": "validation_ece",
    "calibration_source": "source", "threshold_floor": "threshold_floor",
    "head_refit": "head_refit",
}  # fmt: skip
_V1_PROVENANCE = ("busdx_version", "environment", "weights", "epoch", "val_loss", "config",
                  "exported_from", "export_environment", "adaptation")  # fmt: skip
_V1_SCOPE_ARRAYS = ("mean", "precision")
# what a version-1 file holds besides its metadata: weights, and in last.pt the resume state
_V1_TENSORS = {"state_dict", "optimizer", "schedule", "scaler", "ema", "history",
               "best_val_loss", "stale_epochs"}  # fmt: skip


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScopeGuard(_Frozen):
    """The out-of-scope guard's settings; its arrays are tensors beside the weights (in an
    ONNX export, inside the graph)."""

    threshold: float  # Mahalanobis distance above which an input is unlike the training images
    quantile: float
    margin: float
    fitted_on: int  # training images
    threshold_from: int  # held-out in-scope images
    feature: str


class Provenance(_Frozen):
    """Where the model came from: software, machine, pretrained weights, epoch, config, and
    for an ONNX export the ``model.pt`` it was exported from."""

    busdx_version: str
    environment: dict[str, Any] = {}
    weights: dict[str, str | None] = {}  # name, sha256 of the pretrained weights (None: none)
    epoch: int | None = None
    val_loss: float | None = None
    config: dict[str, Any] | None = None  # the resolved config it was trained with
    exported_from: dict[str, str] | None = None  # file, sha256
    export_environment: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None  # busdx adapt: BatchNorm statistics


class ModelInfo(_Frozen):
    """Everything besides the tensors that a model file needs to be used on its own."""

    class_names: tuple[str, str]
    positive_class: str
    threshold: float
    preprocessing: Preprocessing
    network: dict[str, Any]  # the ``model`` section of the config it was trained with
    calibration: Calibration | None = None
    scope: ScopeGuard | None = None
    ensemble_size: int = 1  # > 1: the mean logit of that many networks (cross-fitting)
    int8_weight_bits: int | None = None  # an int8 export: 8 needs a CPU with VNNI or AMX
    provenance: Provenance

    @classmethod
    def for_training(
        cls, config: Config, weights: Mapping[str, str], prep: Preprocessing,
        class_names: Sequence[str],
    ) -> ModelInfo:  # fmt: skip
        """What a model file says of a network trained with ``config`` from the pretrained
        ``weights`` (name, sha256), before calibration: threshold 0.5, this busdx and machine."""
        return cls(
            class_names=tuple(class_names), positive_class=config.data.positive_class,
            threshold=0.5, preprocessing=prep, network=config.model.model_dump(),
            provenance=Provenance(busdx_version=__version__, environment=environment(),
                                  weights=dict(weights), config=config.to_dict()),
        )  # fmt: skip

    @property
    def calibrated(self) -> bool:
        """Whether a temperature was fitted after training."""
        return self.calibration is not None

    @property
    def temperature(self) -> float:
        """Temperature-scaling factor (1.0: uncalibrated)."""
        return 1.0 if self.calibration is None else self.calibration.temperature

    @property
    def outlines(self) -> bool:
        """Whether the network has a mask head."""
        return bool(self.network.get("mask_head"))

    def replace(self, **changes: Any) -> ModelInfo:
        """A copy with some fields changed, validated (``provenance`` may be a dict of the
        provenance fields to change)."""
        if isinstance(changes.get("provenance"), dict):
            changes["provenance"] = self.provenance.model_copy(update=changes["provenance"])
        return ModelInfo.model_validate({**dict(self), **changes})

    def calibrated_with(self, calibration: Calibration) -> ModelInfo:
        """A copy deciding at ``calibration``'s threshold and temperature (for instance what
        :func:`busdx.stats.calibration.fit_operating_points` fitted)."""
        return self.replace(threshold=calibration.threshold, calibration=calibration)


def read_info(metadata: Mapping[str, Any]) -> ModelInfo:
    """A model file's metadata (``model.pt``'s payload, or an ONNX export's JSON) as
    :class:`ModelInfo`. Version-1 flat keys are moved where they belong; tensors are left out.
    Raises :class:`~busdx.errors.CheckpointError` for another format or a file from a newer
    busdx (an unknown key)."""
    if metadata.get("format") != FORMAT:
        raise CheckpointError("not a busdx model file (no format: busdx-model)")
    try:
        if metadata.get("format_version") == FORMAT_VERSION:
            return ModelInfo.model_validate(metadata["info"])
        if metadata.get("format_version") == 1:
            return _migrate_v1(metadata)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise CheckpointError(
            f"model file metadata does not fit busdx {FORMAT_VERSION}: {where}: {first['msg']} "
            "(a file from a newer busdx? upgrade busdx)"
        ) from exc
    raise CheckpointError(
        f"model file format version {metadata.get('format_version')!r} is not one this busdx "
        f"reads (1 or {FORMAT_VERSION}); upgrade busdx"
    )


def _migrate_v1(metadata: Mapping[str, Any]) -> ModelInfo:
    flat = {key: value for key, value in metadata.items() if key not in _V1_TENSORS}
    del flat["format"], flat["format_version"]
    calibration = {_V1_CALIBRATION[k]: flat.pop(k) for k in list(flat) if k in _V1_CALIBRATION}
    if calibration:
        calibration["threshold"] = flat["threshold"]
    provenance = {k: flat.pop(k) for k in _V1_PROVENANCE if k in flat}
    scope = flat.pop("scope", None)
    if scope is not None:
        scope = {k: v for k, v in scope.items() if k not in _V1_SCOPE_ARRAYS}
    network = flat.pop("model", {})
    return ModelInfo.model_validate({**flat, "network": network, "scope": scope,
                                     "calibration": calibration or None,
                                     "provenance": provenance})  # fmt: skip


def info_json(info: ModelInfo) -> str:
    """The metadata an ONNX export carries (its ``busdx`` metadata entry), as JSON."""
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                       "info": info.model_dump(mode="json")})  # fmt: skip


def read_model_file(path: Path) -> tuple[ModelInfo, dict[str, Any]]:
    """``model.pt`` (or a ``last.pt``) read safely: its :class:`ModelInfo` and its tensors
    (``state_dict``, ``scope_arrays`` ``{"mean", "precision"}`` where a guard was fitted, and
    whatever else was saved beside them, such as a resume state)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a loadable busdx model file ({type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a busdx model file")
    try:
        info = read_info(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    tensors = {k: v for k, v in payload.items() if k not in {"format", "format_version", "info"}}
    if payload.get("format_version") == 1:
        tensors = {k: v for k, v in payload.items() if k in _V1_TENSORS}
        scope = payload.get("scope")
        if scope is not None:
            tensors["scope_arrays"] = {k: scope[k] for k in _V1_SCOPE_ARRAYS}
    return info, tensors


def write_model_file(path: Path, info: ModelInfo, **tensors: Any) -> None:
    """Write a model file atomically: ``info`` and the tensors (``state_dict``,
    ``scope_arrays``, a resume state...), plain types only, so that it loads with
    ``torch.load(..., weights_only=True)``."""
    import torch

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "info": info.model_dump(mode="json"), **tensors}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def update_model_file(path: Path, info: ModelInfo, **tensors: Any) -> None:
    """Rewrite a model file atomically with a new ``info`` and some tensors replaced or added
    (an older file is written in the current format)."""
    _, kept = read_model_file(path)
    write_model_file(path, info, **{**kept, **tensors})
