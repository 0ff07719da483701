"""What runs a network for a :class:`~busdx.inference.predictor.Predictor`: float32 inputs in, NumPy
:class:`Outputs` out. :class:`OnnxEngine` is an exported model in ONNX Runtime (no torch);
:class:`busdx.networks.torch_engine.TorchEngine` the PyTorch network."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

__all__ = ["LESION_MASK_OUTPUT", "SCOPE_DISTANCE_OUTPUT", "Engine", "OnnxEngine", "Outputs"]

SCOPE_DISTANCE_OUTPUT = "scope_distance"  # ONNX outputs beside "logits"
LESION_MASK_OUTPUT = "lesion_mask"  # N x H x W lesion probabilities (mask-head models)


class Outputs(NamedTuple):
    """A network's answers for a batch: raw logits (N), each input's out-of-scope distance (N;
    None without a fitted guard) and lesion-mask probabilities (N x H x W; None without a
    mask head)."""

    logits: np.ndarray
    distances: np.ndarray | None
    masks: np.ndarray | None


class Engine(Protocol):
    """What runs the network: float32 inputs (N x 3 x H x W) -> :class:`Outputs`."""

    name: ClassVar[str]

    @property
    def outlines(self) -> bool: ...

    def forward(self, images: np.ndarray) -> Outputs: ...


@dataclass(frozen=True)
class OnnxEngine:
    """An exported model in ONNX Runtime; its optional outputs are the guard's distance and
    the lesion mask."""

    session: Any  # onnxruntime.InferenceSession
    name: ClassVar[str] = "onnx"

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [output.name for output in self.session.get_outputs()]

    @property
    def outlines(self) -> bool:
        return LESION_MASK_OUTPUT in self.output_names

    def forward(self, images: np.ndarray) -> Outputs:
        answers = self.session.run(None, {"images": np.ascontiguousarray(images, np.float32)})
        outputs = dict(zip(self.output_names, answers, strict=True))
        return Outputs(outputs["logits"], outputs.get(SCOPE_DISTANCE_OUTPUT),
                       outputs.get(LESION_MASK_OUTPUT))  # fmt: skip
