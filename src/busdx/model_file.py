"""What a model file carries, typed: one schema for ``model.pt`` and the metadata of its ONNX
exports, read here (migrating older layouts) and written here.

A model file is its tensors (weights; the out-of-scope guard's mean and precision matrix) and
:class:`ModelInfo`: preprocessing, class names, the decision threshold, how probabilities were
calibrated and where (:class:`Calibration`), the out-of-scope guard's settings
(:class:`ScopeGuard`), the network (its ``model`` config, whether it outlines) and where it
came from (:class:`Provenance`). Version 1 files hold all of it as flat keys; :func:`read_info`
reads those as they are, so every model file written since busdx 0.1 still loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from busdx.preprocess import Preprocessing
from busdx.results import SensitivityPromise

__all__ = ["FORMAT", "Calibration", "ModelInfo", "Provenance", "ScopeGuard", "read_info"]

FORMAT = "busdx-model"
# flat version-1 keys -> where they live in ModelInfo (the rest are ModelInfo's own)
_CALIBRATION_KEYS = {
    "temperature": "temperature", "threshold_policy": "threshold_policy",
    "target_sensitivity": "target_sensitivity", "threshold_confidence": "threshold_confidence",
    "operating_points": "operating_points", "sensitivity_promise": "sensitivity_promise",
    "calibration_cases": "cases", "validation_ece": "validation_ece",
    "calibration_source": "source", "threshold_floor": "threshold_floor",
    "head_refit": "head_refit",
}  # fmt: skip
_PROVENANCE_KEYS = ("busdx_version", "environment", "weights", "epoch", "val_loss", "config",
                    "exported_from", "export_environment", "adaptation")  # fmt: skip


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Calibration(_Frozen):
    """How probabilities and the threshold were fitted after training, and on what."""

    temperature: float
    threshold_policy: str | None = None
    target_sensitivity: float | None = None
    threshold_confidence: float | None = None
    operating_points: dict[str, float] = {}
    sensitivity_promise: SensitivityPromise | None = None
    cases: dict[str, int] | None = None  # n, n_positive
    validation_ece: dict[str, float] | None = None
    source: str | None = None  # the validation split, a site's cases, out-of-site predictions
    threshold_floor: dict[str, Any] | None = None  # busdx calibrate kept the model's own
    head_refit: dict[str, Any] | None = None  # busdx calibrate --refit-head


class ScopeGuard(_Frozen):
    """The out-of-scope guard's settings (its arrays stay beside the weights)."""

    threshold: float
    quantile: float
    margin: float
    fitted_on: int
    threshold_from: int
    feature: str


class Provenance(_Frozen):
    """Where the model came from: software, machine, pretrained weights, epoch, config, and
    for an ONNX export the ``model.pt`` it was exported from."""

    busdx_version: str
    environment: dict[str, Any] = {}
    weights: dict[str, str] = {}  # name, sha256 of the pretrained weights
    epoch: int | None = None
    val_loss: float | None = None
    config: dict[str, Any] | None = None
    exported_from: dict[str, str] | None = None  # file, sha256
    export_environment: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None  # busdx adapt: BatchNorm statistics


class ModelInfo(_Frozen):
    """Everything besides the tensors that a model file needs to be used on its own."""

    format_version: int
    class_names: tuple[str, str]
    positive_class: str
    threshold: float
    preprocessing: Preprocessing
    network: dict[str, Any]  # the ``model`` section of the config it was trained with
    calibration: Calibration | None = None
    scope: ScopeGuard | None = None
    ensemble_size: int = 1
    int8_weight_bits: int | None = None  # an int8 export: 8 needs a CPU with VNNI or AMX
    provenance: Provenance

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


def read_info(metadata: Mapping[str, Any]) -> ModelInfo:
    """A model file's metadata (``model.pt`` without its tensors, or an ONNX export's JSON) as
    :class:`ModelInfo`; version-1 flat keys are moved where they belong. Arrays (the guard's
    mean and precision) are left out; an unknown key is refused (a file from a newer busdx)."""
    flat = {key: value for key, value in metadata.items() if key not in {"state_dict", "optimizer"}}
    if flat.pop("format", None) != FORMAT:
        raise ValueError("not a busdx model file (no format: busdx-model)")
    calibration = {_CALIBRATION_KEYS[k]: flat.pop(k) for k in list(flat) if k in _CALIBRATION_KEYS}
    provenance = {k: flat.pop(k) for k in _PROVENANCE_KEYS if k in flat}
    scope = flat.pop("scope", None)
    if scope is not None:
        scope = {k: v for k, v in scope.items() if not hasattr(v, "shape")}
    preprocessing = Preprocessing.from_dict(flat.pop("preprocessing"))
    network = flat.pop("model", {})
    return ModelInfo(**flat, preprocessing=preprocessing, network=network, scope=scope,
                     calibration=calibration or None, provenance=provenance)  # fmt: skip
