"""A trained model as one object: its file, preprocessing, calibrated probability and decision.

:func:`load_model` reads a run directory, ``model.pt`` (``torch.load(..., weights_only=True)``:
an untrusted file cannot run code) or an exported ONNX file (checked against the ``model.pt``
it was exported from) into a :class:`Predictor`. Every path that turns logits into a
probability or a label (predict, evaluate, export checks, serve, explain) goes through it, for
the torch and ONNX Runtime backends alike: ``sigmoid(logit / temperature)`` in float64, then
``probability >= threshold`` (:func:`busdx.metrics.is_positive`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from busdx.calibration import apply_temperature
from busdx.config import ModelConfig
from busdx.devices import autocast, check_precision, cpu_has_vnni, resolve_device
from busdx.errors import CheckpointError, ConfigError
from busdx.fileio import sha256_file
from busdx.layout import INT8_FILE, MODEL_FILE, ONNX_FILE
from busdx.likelihood import likelihood_category
from busdx.metrics import is_positive
from busdx.models import BinaryClassifier, Ensemble, create_model
from busdx.preprocess import Preprocessing
from busdx.scope import SCOPE_KEY, image_checks, logits_and_features, scope_distances
from busdx.transforms import build_eval_transform

__all__ = [
    "BACKENDS",
    "EXPORT_STAMP",
    "INT8_WEIGHT_BITS",
    "LESION_MASK_OUTPUT",
    "ONNX_METADATA_KEY",
    "SCOPE_DISTANCE_OUTPUT",
    "Decision",
    "Predictor",
    "load_model",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
INT8_FILE = INT8_FILE
EXPORT_STAMP = "exported_from"  # ONNX metadata: {"file", "sha256"} of the model.pt exported
INT8_WEIGHT_BITS = "int8_weight_bits"  # ONNX metadata: 8 needs a CPU with VNNI or AMX
ONNX_METADATA_KEY = "busdx"
SCOPE_DISTANCE_OUTPUT = "scope_distance"  # ONNX outputs beside "logits"
LESION_MASK_OUTPUT = "lesion_mask"  # N x H x W lesion probabilities (mask-head models)


@dataclass
class Decision:
    """What the model says about one image."""

    logit: float  # raw log-odds, before temperature scaling
    probability: float  # calibrated probability of the positive class
    label: str | None  # decided at the threshold; None for an out-of-scope input (by default)
    scope_distance: float | None  # feature distance from the training images (None: no guard)
    out_of_scope: bool | None  # not a B-mode scan (the pixel rules of busdx.scope.image_checks)
    scope_reason: str | None
    mask: np.ndarray | None = None  # lesion-mask probability on the input (mask-head models)
    likelihood_category: str | None = None  # BI-RADS range of a calibrated probability


@dataclass
class Predictor:
    """A trained classifier ready to predict, with everything needed to use it.

    ``model`` is the PyTorch network (backend ``torch``; also used for explanations),
    ``session`` an ONNX Runtime session (backend ``onnx``).
    """

    metadata: dict[str, Any]
    preprocessing: Preprocessing
    path: Path
    model: BinaryClassifier | Ensemble | None = None
    session: Any = None  # onnxruntime.InferenceSession
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # torch backend: "bf16" / "fp16" run under autocast
    flip: bool = False  # test-time augmentation: average with the mirrored image's answer

    @property
    def backend(self) -> str:
        return "onnx" if self.session is not None else "torch"

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def temperature(self) -> float:
        """Temperature-scaling factor fitted on validation data (1.0: uncalibrated)."""
        return float(self.metadata.get("temperature", 1.0))

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Calibrated probability of the positive class, ``sigmoid(logit / temperature)``, in
        float64 whatever the backend's logits were."""
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().cpu().numpy()
        return apply_temperature(logits, self.temperature)

    def decide(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """True where the positive class is called at ``threshold`` (default: the model's)."""
        return is_positive(probabilities, self.threshold if threshold is None else threshold)

    def label(self, probability: float, threshold: float | None = None) -> str:
        """Class name decided at ``threshold`` (default: the model's own)."""
        return self.class_names[int(self.decide(np.asarray(probability), threshold))]

    @functools.cached_property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The model's own preprocessing: RGB PIL image -> normalized input tensor."""
        return build_eval_transform(self.preprocessing)

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
        (an ROI model's lesion boxes, :func:`busdx.preprocess.region_of`). An input flagged out
        of scope gets its probability and the reason, but no label unless
        ``label_out_of_scope``."""
        if not images:
            return []
        inputs = torch.stack([self.transform(region) for region in (regions or images)])
        checks = [image_checks(image) for image in images]
        return self.decide_inputs(inputs, checks, threshold, label_out_of_scope=label_out_of_scope)

    def decide_inputs(
        self, inputs: torch.Tensor, checks: list[list[str]], threshold: float | None = None,
        *, label_out_of_scope: bool = False,
    ) -> list[Decision]:  # fmt: skip
        """:meth:`decide_images` from preprocessed images (a batch tensor) and their
        :func:`busdx.scope.image_checks` (both made in loader workers by ``busdx predict``)."""
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
        return "temperature" in self.metadata

    @property
    def outlines(self) -> bool:
        """Whether the model outlines lesions (a mask head, or its export's ``lesion_mask``)."""
        if self.session is not None:
            return LESION_MASK_OUTPUT in self.output_names
        return getattr(self.model, "mask_decoder", None) is not None

    @functools.cached_property
    def output_names(self) -> list[str]:
        """The ONNX model's outputs (empty for the torch backend)."""
        return [] if self.session is None else [o.name for o in self.session.get_outputs()]

    @torch.inference_mode()
    def predict(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
        """Raw log-odds of the positive class for a batch of preprocessed images, each image's
        out-of-scope distance (see :mod:`busdx.scope`; None without a fitted guard, or from an
        ONNX model exported without one) and, from a model with a mask head, each image's
        lesion-mask probabilities (N x H x W; else None). The backbone runs once for all.

        With ``flip`` the model also sees each image mirrored left to right: the logits are
        the mean of the two answers' log-odds and the mask the mean of the two masks (the
        mirrored one mirrored back); the distance is the unmirrored image's, as the guard was
        fitted on unmirrored features."""
        logits, distances, masks = self._forward(images)
        if not self.flip:
            return logits, distances, masks
        mirrored_logits, _, mirrored_masks = self._forward(images.flip(-1))
        if masks is not None:
            masks = (masks + mirrored_masks[..., ::-1]) / 2
        return (logits + mirrored_logits) / 2, distances, masks

    def _forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
        if self.session is not None:  # an export may have the distance and the mask too
            answers = self.session.run(None, {"images": images.numpy()})
            outputs = dict(zip(self.output_names, answers, strict=True))
            return (torch.from_numpy(outputs["logits"]), outputs.get(SCOPE_DISTANCE_OUTPUT),
                    outputs.get(LESION_MASK_OUTPUT))  # fmt: skip
        images = images.to(self.device, non_blocking=True)
        scope = self.metadata.get(SCOPE_KEY)
        with autocast(self.device, self.precision):
            if self.outlines:
                logits, masks, features = self.model.segment(images)
                masks = torch.sigmoid(masks.float()).cpu().numpy()
            elif scope is None:
                return self.model(images).float().cpu(), None, None
            else:
                (logits, features), masks = logits_and_features(self.model, images), None
        distances = None if scope is None else scope_distances(scope, features.float())
        return logits.float().cpu(), distances, masks

    @staticmethod
    def scope_reason(checks: list[str]) -> str | None:
        """Why an input is not a B-mode scan (None: it passes every pixel rule of
        :func:`busdx.scope.image_checks`). The feature distance is reported beside the answer
        but no longer decides it: at hospitals the model never saw it flagged ordinary scans
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
    fp32 ONNX model. ``backend="auto"`` picks the fastest valid model: on a CPU the exported
    int8 model when there is one and it was exported from the run's current ``model.pt`` (about
    3x the torch backend's speed here, see docs/benchmarks.md), else the torch model; on a GPU
    the torch model. ``threads`` caps the CPU threads the model uses (default: all cores).
    A model with a mask head outlines on every backend: its ONNX exports carry the mask as a
    second (or third) output; an older export without it is passed over for the torch model
    under ``auto``. ``precision`` ``bf16`` or ``fp16`` runs the torch model under autocast (a
    GPU, or a CPU with native bf16); it selects the torch backend. ``flip`` averages each
    answer with that of the image mirrored left to right (twice the work).
    """
    loaded = _load(path, device=device, backend=backend, threads=threads, precision=precision)
    loaded.flip = flip
    return loaded


def _load(path: str | Path, *, device: str, backend: str, threads: int | None,
          precision: str) -> Predictor:  # fmt: skip
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision != "fp32":
        if backend == "onnx" or path.suffix == ".onnx":
            raise ConfigError(f"precision {precision} runs the torch model; use --backend torch")
        check_precision(precision, resolve_device(device))
        backend = "torch"
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if backend == "auto" and path.suffix != ".onnx":
        loaded = _exported_int8(path, device, threads)
        if loaded is not None:
            return loaded
        backend = "torch"
    if backend in {"auto", "onnx"} or path.suffix == ".onnx":
        return _load_onnx(path, threads)
    return _load_torch(path, device, precision)


def _load_torch(path: Path, device: str, precision: str) -> Predictor:
    """``model.pt`` (or a run directory's), loaded with ``weights_only=True``."""
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}; train a model first (busdx train)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a loadable busdx model file ({type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != "busdx-model":
        raise CheckpointError(f"{path} is not a busdx model file")
    prep = Preprocessing.from_dict(payload["preprocessing"])
    config = ModelConfig(**payload["model"])
    members = [
        create_model(config, image_size=prep.image_size, load_weights=False)[0]
        for _ in range(int(payload.get("ensemble_size", 1)))
    ]
    model = Ensemble(members) if "ensemble_size" in payload else members[0]
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model it describes") from exc
    target = resolve_device(device)
    model.to(target).eval()
    metadata = {k: v for k, v in payload.items() if k not in {"state_dict", "optimizer"}}
    if SCOPE_KEY in metadata:  # stored in float16; upcast once here, not on every batch
        scope = metadata[SCOPE_KEY]
        metadata[SCOPE_KEY] = {**scope, "precision": scope["precision"].float()}
    return Predictor(metadata, prep, path, model=model, device=target, precision=precision)


def _exported_int8(path: Path, device: str, threads: int | None) -> Predictor | None:
    """The run's int8 ONNX model if it is valid and the model would run on a CPU, else None."""
    int8 = path / INT8_FILE if path.is_dir() else path.with_name(INT8_FILE)
    if resolve_device(device).type != "cpu" or not int8.is_file():
        return None
    try:
        loaded = _load_onnx(int8, threads)
    except CheckpointError as exc:
        logger.warning("%s; using the torch model meanwhile", exc)
        return None
    if loaded.metadata.get("model", {}).get("mask_head") and not loaded.outlines:
        logger.info("the model outlines lesions with its mask head, which %s (an older export) "
                    "lacks: using the torch model", INT8_FILE)  # fmt: skip
        return None
    if loaded.metadata.get(INT8_WEIGHT_BITS) == 8 and not cpu_has_vnni():
        logger.info("%s has 8-bit weights, which this CPU (no VNNI or AMX) can saturate; using "
                    "the torch model", INT8_FILE)  # fmt: skip
        return None
    logger.info("using %s (ONNX Runtime int8, the fastest on a CPU; --backend torch for "
                "the PyTorch model)", INT8_FILE)  # fmt: skip
    return loaded


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
        # ONNX Runtime's threads do the model's work; torch only preprocesses, image by image.
        # Two thread pools spinning for the same cores starved each other: one torch thread and
        # no spinning took busdx predict from 26 to 86 img/s end to end on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        torch.set_num_threads(1)
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        metadata = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not an ONNX model exported by busdx ({type(exc).__name__})"
        ) from exc
    _check_stamp(path, metadata)
    prep = Preprocessing.from_dict(metadata["preprocessing"])
    return Predictor(metadata, prep, path, session=session)


def _check_stamp(path: Path, metadata: dict[str, Any]) -> None:
    """Refuse an ONNX file that was not exported from the ``model.pt`` beside it: after a
    resume, a recalibration or a copy from another run it would answer for another model. An
    ONNX file alone (a deployment without ``model.pt``) has nothing to disagree with."""
    source = path.parent / MODEL_FILE
    if not source.is_file():
        return
    stamp = metadata.get(EXPORT_STAMP) or {}
    if stamp.get("sha256") != sha256_file(source):
        raise CheckpointError(
            f"{path} was not exported from the {MODEL_FILE} beside it (changed since by a "
            f"resume, a recalibration or a copy); export again: busdx export --run {path.parent}"
            + (" --int8" if path.name == INT8_FILE else "")
        )
