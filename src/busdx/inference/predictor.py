"""A trained model as one object: its file, preprocessing, calibrated probability and decision.

:func:`load_model` reads a run directory, ``model.pt`` (``torch.load(..., weights_only=True)``:
an untrusted file cannot run code) or an exported ONNX file (checked against the ``model.pt``
it was exported from) into a :class:`Predictor`. Every path that turns logits into a
probability or a label (predict, evaluate, export checks, serve, explain) goes through it, for
the torch and ONNX Runtime backends alike: ``sigmoid(logit / temperature)`` in float64, then
``probability >= threshold`` (:func:`busdx.stats.metrics.is_positive`).

This module imports no torch: a :class:`Predictor` works on NumPy arrays and its engine is
either an ONNX Runtime session (:class:`OnnxEngine`) or, loaded only when asked for or when no
valid ONNX model is there, the PyTorch network (:mod:`busdx.networks.torch_engine`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from busdx.data.preprocess import Preprocessing, model_input
from busdx.errors import CheckpointError, ConfigError
from busdx.fileio import sha256_file
from busdx.hardware import cpu_has_vnni, nvidia_gpu_present
from busdx.inference.engines import Engine, OnnxEngine, Outputs
from busdx.inference.model_file import ONNX_METADATA_KEY, ModelInfo, read_info
from busdx.inference.scope import image_checks
from busdx.layout import INT8_FILE, MODEL_FILE, ONNX_FILE
from busdx.stats.calibration import apply_temperature
from busdx.stats.likelihood import likelihood_category
from busdx.stats.metrics import is_positive

__all__ = ["BACKENDS", "Decision", "Predictor", "load_model"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")


@dataclass
class Decision:
    """What the model says about one image."""

    logit: float  # raw log-odds, before temperature scaling
    probability: float  # calibrated probability of the positive class
    label: str | None  # decided at the threshold; None for an out-of-scope input (by default)
    scope_distance: float | None  # feature distance from the training images (None: no guard)
    out_of_scope: (
        bool | None
    )  # not a B-mode scan (the pixel rules of busdx.inference.scope.image_checks)
    scope_reason: str | None
    mask: np.ndarray | None = None  # lesion-mask probability on the input (mask-head models)
    likelihood_category: str | None = None  # BI-RADS range of a calibrated probability


@dataclass(frozen=True)
class Predictor:
    """A trained classifier ready to predict: what its model file says of it (``info``: see
    :class:`busdx.inference.model_file.ModelInfo`), the file it came from and the ``engine`` that
    runs the network (``backend``: ``"onnx"`` or ``"torch"``). Immutable: a recalibrated model is a
    new file, loaded again."""

    info: ModelInfo
    path: Path
    engine: Engine
    flip: bool = False  # test-time augmentation: average with the mirrored image's answer

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def model(self) -> Any:
        """The PyTorch network (torch backend; Grad-CAM and refitting need it), else None."""
        return getattr(self.engine, "model", None)

    @property
    def device(self) -> Any:
        """The torch device the network runs on (torch backend), else None."""
        return getattr(self.engine, "device", None)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def threshold(self) -> float:
        return self.info.threshold

    @property
    def temperature(self) -> float:
        """Temperature-scaling factor fitted on validation data (1.0: uncalibrated)."""
        return self.info.temperature

    def probabilities(self, logits: Any) -> np.ndarray:
        """Calibrated probability of the positive class, ``sigmoid(logit / temperature)``, in
        float64 whatever the backend's logits were (arrays, or tensors on the CPU)."""
        return apply_temperature(np.asarray(logits, dtype=np.float64), self.temperature)

    def decide(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """True where the positive class is called at ``threshold`` (default: the model's)."""
        return is_positive(probabilities, self.threshold if threshold is None else threshold)

    def label(self, probability: float, threshold: float | None = None) -> str:
        """Class name decided at ``threshold`` (default: the model's own)."""
        return self.class_names[int(self.decide(np.asarray(probability), threshold))]

    def inputs(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The network's float32 input for decoded RGB images (N x 3 x H x W)."""
        return np.stack([model_input(image, self.preprocessing) for image in images])

    def decide_images(
        self,
        images: Sequence[Image.Image],
        threshold: float | None = None,
        *,
        regions: Sequence[Image.Image] | None = None,
        label_out_of_scope: bool = False,
    ) -> list[Decision]:
        """Preprocess, score and decide a batch of decoded RGB images (see :class:`Decision`);
        the one path from images to answers of ``busdx predict``, evaluate and the API.
        ``regions``: what the model looks at in each image when it is not the whole image
        (an ROI model's lesion boxes, :func:`busdx.data.preprocess.region_of`). An input flagged out
        of scope gets its probability and the reason, but no label unless
        ``label_out_of_scope``."""
        if not images:
            return []
        inputs = self.inputs(regions or images)
        checks = [image_checks(image) for image in images]
        return self.decide_inputs(inputs, checks, threshold, label_out_of_scope=label_out_of_scope)

    def decide_inputs(
        self, inputs: np.ndarray, checks: list[list[str]], threshold: float | None = None,
        *, label_out_of_scope: bool = False,
    ) -> list[Decision]:  # fmt: skip
        """:meth:`decide_images` from preprocessed images (a batch array) and their
        :func:`busdx.inference.scope.image_checks` (both made in decoding workers by ``busdx
        predict``)."""
        if not len(inputs):
            return []
        logits, distances, masks = self.predict(inputs)
        distances = [None] * len(inputs) if distances is None else distances.tolist()
        masks = [None] * len(inputs) if masks is None else list(masks)
        decisions = []
        for image_checks_, logit, probability, distance, mask in zip(
            checks, logits.tolist(), self.probabilities(logits).tolist(), distances, masks,
            strict=True,
        ):  # fmt: skip
            reason = self.scope_reason(image_checks_)
            label = (
                None if reason and not label_out_of_scope else self.label(probability, threshold)
            )
            decisions.append(Decision(
                logit, probability, label, distance, reason is not None, reason, mask,
                likelihood_category(probability) if self.calibrated else None,
            ))  # fmt: skip
        return decisions

    @property
    def calibrated(self) -> bool:
        """Whether probabilities are calibrated (temperature scaling fitted after training)."""
        return self.info.calibrated

    @property
    def outlines(self) -> bool:
        """Whether the model outlines lesions (a mask head, or its export's ``lesion_mask``)."""
        return self.engine.outlines

    def predict(self, images: np.ndarray) -> Outputs:
        """Raw log-odds of the positive class for a batch of preprocessed images (float32,
        N x 3 x H x W), each image's out-of-scope distance (see :mod:`busdx.inference.scope`; None
        without a fitted guard, or from an ONNX model exported without one) and, from a model with a
        mask head, each image's lesion-mask probabilities (N x H x W; else None). The backbone
        runs once for all.

        With ``flip`` the model also sees each image mirrored left to right: the logits are
        the mean of the two answers' log-odds and the mask the mean of the two masks (the
        mirrored one mirrored back); the distance is the unmirrored image's, as the guard was
        fitted on unmirrored features."""
        outputs = self.engine.forward(images)
        if not self.flip:
            return outputs
        mirrored = self.engine.forward(np.ascontiguousarray(images[..., ::-1]))
        masks = outputs.masks
        if masks is not None:
            masks = (masks + mirrored.masks[..., ::-1]) / 2
        return Outputs((outputs.logits + mirrored.logits) / 2, outputs.distances, masks)

    @staticmethod
    def scope_reason(checks: list[str]) -> str | None:
        """Why an input is not a B-mode scan (None: it passes every pixel rule of
        :func:`busdx.inference.scope.image_checks`). The feature distance is reported beside the
        answer but no longer decides it: at hospitals the model never saw it flagged ordinary scans
        while noise passed (docs/scope.md)."""
        return "; ".join(checks) or None


def load_model(
    path: str | Path,
    *,
    device: str = "auto",
    backend: str = "torch",
    threads: int | None = None,
    precision: str = "fp32",
    flip: bool = False,
) -> Predictor:
    """Load a trained model safely: a run directory, ``model.pt`` or an ``.onnx`` file.

    With ``backend="onnx"`` a run directory gives its int8 model when there is one, else its
    fp32 ONNX model. ``backend="auto"`` picks the fastest valid model without importing torch
    where it can: on a CPU the exported int8 model when there is one, it was exported from the
    run's current ``model.pt`` and the CPU has VNNI or AMX (about 3x the torch backend's speed
    here, see docs/benchmarks.md), else its fp32 ONNX model on the same terms, else the torch
    model; with a GPU the torch model. ``threads`` caps the CPU threads the model uses
    (default: all cores). A model with a mask head outlines on every backend: its ONNX exports
    carry the mask as an output; an older export without it is passed over under ``auto``.
    ``precision`` ``bf16`` or ``fp16`` runs the torch model under autocast (a GPU, or a CPU
    with native bf16); it selects the torch backend. ``flip`` averages each answer with that of
    the image mirrored left to right (twice the work).
    """
    loaded = _load(path, device=device, backend=backend, threads=threads, precision=precision)
    return replace(loaded, flip=flip) if flip else loaded


def _load(path: str | Path, *, device: str, backend: str, threads: int | None,
          precision: str) -> Predictor:  # fmt: skip
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision != "fp32":
        if backend == "onnx" or path.suffix == ".onnx":
            raise ConfigError(f"precision {precision} runs the torch model; use --backend torch")
        backend = "torch"
    asked = backend
    if backend == "auto" and path.suffix != ".onnx":
        wants_gpu = device == "cuda" or (device == "auto" and nvidia_gpu_present())
        loaded = None if wants_gpu and _torch_installed() else _exported_onnx(path, threads)
        if loaded is not None:
            return loaded
        backend = "torch"
    if backend == "onnx" or path.suffix == ".onnx":
        return _load_onnx(path, threads)
    if not _torch_installed():
        raise ConfigError(
            f"{path} has no valid ONNX model and torch is not installed: install the training "
            "extra (pip install 'busdx[train]') or export the model (busdx export --run ...)"
            if asked == "auto" else
            "the torch backend needs torch, which this install leaves out: use --backend onnx, "
            "or install the training extra (pip install 'busdx[train]')"
        )  # fmt: skip
    from busdx.networks.torch_engine import (
        load_torch_engine,  # torch: seconds to import, only if needed
    )

    return Predictor(*load_torch_engine(path, device=device, precision=precision, threads=threads))


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _exported_onnx(path: Path, threads: int | None) -> Predictor | None:
    """The run's fastest valid ONNX model on this CPU (int8, else fp32), or None."""
    folder = path if path.is_dir() else path.parent
    for name in (INT8_FILE, ONNX_FILE):
        if not (folder / name).is_file():
            continue
        try:
            loaded = _load_onnx(folder / name, threads)
        except CheckpointError as exc:
            logger.warning("%s; passing it over", exc)
            continue
        if loaded.info.outlines and not loaded.outlines:
            logger.info("the model outlines lesions with its mask head, which %s (an older "
                        "export) lacks: passing it over", name)  # fmt: skip
            continue
        if loaded.info.int8_weight_bits == 8 and not cpu_has_vnni():
            logger.info("%s has 8-bit weights, which this CPU (no VNNI or AMX) can saturate; "
                        "passing it over", name)  # fmt: skip
            continue
        logger.info("using %s (ONNX Runtime; --backend torch for the PyTorch model)", name)
        return loaded
    return None


def _load_onnx(path: Path, threads: int | None = None) -> Predictor:
    import onnxruntime

    if path.is_dir():
        found = [path / name for name in (INT8_FILE, ONNX_FILE) if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"no {ONNX_FILE} in {path}; export one first: busdx export --run {path} --int8"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"no ONNX model at {path}; export one first (busdx export)")
    try:
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = max(1, threads), 1
        # Spinning threads starved the processes that decode the next images (measured: 26 ->
        # 86 img/s end to end on 2 cores without spinning).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not an ONNX model exported by busdx ({type(exc).__name__})"
        ) from exc
    try:
        info = read_info(metadata)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    _check_stamp(path, info)
    return Predictor(info, path, OnnxEngine(session))


def _check_stamp(path: Path, info: ModelInfo) -> None:
    """Refuse an ONNX file that was not exported from the ``model.pt`` beside it: after a
    resume, a recalibration or a copy from another run it would answer for another model. An
    ONNX file alone (a deployment without ``model.pt``) has nothing to disagree with."""
    source = path.parent / MODEL_FILE
    if not source.is_file():
        return
    stamp = info.provenance.exported_from or {}
    if stamp.get("sha256") != sha256_file(source):
        raise CheckpointError(
            f"{path} was not exported from the {MODEL_FILE} beside it (changed since by a "
            f"resume, a recalibration or a copy); export again: busdx export --run {path.parent}"
            + (" --int8" if path.name == INT8_FILE else "")
        )
