"""The PyTorch network as a :class:`~busdx.inference.predictor.Predictor`'s engine: ``model.pt``
loaded safely (``torch.load(..., weights_only=True)``), run on a device in a precision. Imported
only when a torch model is asked for (training's evaluation, Grad-CAM, a GPU, a run not exported):
everything else predicts through ONNX Runtime without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from busdx.config import ModelConfig
from busdx.devices import autocast, check_precision, resolve_device
from busdx.errors import CheckpointError
from busdx.inference.engines import Outputs
from busdx.inference.model_file import ModelInfo, read_model_file
from busdx.inference.scope import scope_distances
from busdx.layout import MODEL_FILE
from busdx.networks.classifier import BinaryClassifier, Ensemble, create_model
from busdx.training.scope_fit import logits_and_features

__all__ = ["TorchEngine", "load_torch_engine"]


@dataclass(frozen=True)
class TorchEngine:
    """A network, the device it runs on, the precision it runs in (``bf16`` / ``fp16`` under
    autocast) and the out-of-scope guard it feeds (None: none fitted)."""

    model: BinaryClassifier | Ensemble
    device: torch.device
    precision: str = "fp32"
    scope: dict[str, Any] | None = None
    name: ClassVar[str] = "torch"

    @property
    def outlines(self) -> bool:
        return getattr(self.model, "mask_decoder", None) is not None

    @torch.inference_mode()
    def forward(self, images: np.ndarray | torch.Tensor) -> Outputs:
        images = torch.as_tensor(images).to(self.device, non_blocking=True)
        masks = None
        with autocast(self.device, self.precision):
            if self.outlines:
                logits, mask_logits, features = self.model.segment(images)
                masks = torch.sigmoid(mask_logits.float()).cpu().numpy()
            elif self.scope is None:
                return Outputs(self.model(images).float().cpu().numpy(), None, None)
            else:
                logits, features = logits_and_features(self.model, images)
        distances = (
            None if self.scope is None
            else scope_distances(self.scope, features.float().cpu().numpy())
        )  # fmt: skip
        return Outputs(logits.float().cpu().numpy(), distances, masks)


def load_torch_engine(
    path: Path, *, device: str = "auto", precision: str = "fp32", threads: int | None = None
) -> tuple[ModelInfo, Path, TorchEngine]:
    """``model.pt`` (or a run directory's): what it says of itself, its path and the
    :class:`TorchEngine` that runs it, the fields of a
    :class:`~busdx.inference.predictor.Predictor`."""
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; train a model first (busdx train)")
    target = resolve_device(device)
    check_precision(precision, target)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    info, tensors = read_model_file(path)
    config = ModelConfig(**info.network)
    members = [
        create_model(config, image_size=info.preprocessing.image_size, load_weights=False)[0]
        for _ in range(info.ensemble_size)
    ]
    model = Ensemble(members) if info.ensemble_size > 1 else members[0]
    try:
        model.load_state_dict(tensors["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model it describes") from exc
    model.to(target).eval()
    scope = tensors.get("scope_arrays")
    if scope is not None:  # stored in float16; as float32 arrays once here, not every batch
        scope = {name: array.float().numpy() for name, array in scope.items()}
    return info, path, TorchEngine(model, target, precision, scope)
