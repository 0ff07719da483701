"""Export a trained model to ONNX, and quantize it to int8 for fast CPU inference.

``export_run`` writes ``model.onnx`` (fp32, dynamic batch) into a run directory and, with
``int8=True``, ``model.int8.onnx``: static int8 quantization (QDQ, per-channel 7-bit weights) with
activation ranges calibrated on training images. Both files carry the model's metadata
(preprocessing, class names, threshold, temperature, weights sha256, busdx version), so
``busdx predict --backend onnx`` needs nothing else.

The int8 model is checked against the fp32 one on the run's validation images: the fraction of
identical decisions and the ROC AUC of each are reported in ``export.json``, and an int8 model
that loses more than ``max_auc_drop`` AUC is refused unless ``force`` is set.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from busdx import __version__
from busdx.bundled import is_bundled, output_home, resolve_run
from busdx.data.imaging import InputLike, as_input
from busdx.data.inputs import expand_paths
from busdx.data.preprocess import load_region
from busdx.errors import BoxError, DataError, ExportError, ImageDecodeError, SingleClassError
from busdx.fileio import atomic_path, sha256_file
from busdx.inference.batch import file_logits
from busdx.inference.engines import LESION_MASK_OUTPUT, SCOPE_DISTANCE_OUTPUT
from busdx.inference.model_file import ONNX_METADATA_KEY, info_json
from busdx.inference.predictor import Predictor, load_model
from busdx.layout import (
    CONFIG_FILE,
    EXPORT_REPORT,
    INFO_FILE,
    INT8_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SPLIT_FILE,
)
from busdx.provenance import environment
from busdx.results import (
    CalibrationImages,
    ExportedFile,
    ExportReport,
    Int8Export,
    LogitComparison,
)
from busdx.runs import load_run, samples_for_split
from busdx.stats.metrics import roc_auc
from busdx.training.scope_fit import Guard, logits_and_features
from busdx.training.transforms import build_eval_transform

__all__ = ["compare_logits", "export_onnx", "export_run", "format_export", "quantize_int8"]

logger = logging.getLogger(__name__)

OPSET = 17


def _add_metadata(path: Path, loaded: Predictor, int8_weight_bits: int | None = None) -> None:
    """The model file's :class:`~busdx.inference.model_file.ModelInfo`, stamped with the sha256 of
    the file it was exported from (``provenance.exported_from``, checked on load) and the
    exporting machine; the guard's arrays are inside the graph."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    info = loaded.info.replace(int8_weight_bits=int8_weight_bits, provenance={
        "exported_from": {"file": loaded.path.name, "sha256": sha256_file(loaded.path)},
        "export_environment": environment(),
    })  # fmt: skip
    entry.key, entry.value = ONNX_METADATA_KEY, info_json(info)
    onnx.save(model, str(path))


class ExportGraph(nn.Module):
    """What an exported model computes from ``images``: ``logits``; then, for a model with an
    out-of-scope guard, ``scope_distance``; then, for a model with a mask head,
    ``lesion_mask`` (N x H x W lesion probabilities at the input's size). One backbone pass
    gives them all."""

    def __init__(self, model: nn.Module, scope: dict[str, np.ndarray] | None) -> None:
        super().__init__()
        self.model = model
        self.guard = None if scope is None else Guard(
            torch.as_tensor(scope["mean"]), torch.as_tensor(scope["precision"])
        )  # fmt: skip
        self.outlines = getattr(model, "mask_decoder", None) is not None

    @property
    def output_names(self) -> list[str]:
        guard = [] if self.guard is None else [SCOPE_DISTANCE_OUTPUT]
        return ["logits", *guard, *([LESION_MASK_OUTPUT] if self.outlines else [])]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.outlines:
            logits, masks, features = self.model.segment(images)
            masks = (torch.sigmoid(masks),)
        elif self.guard is not None:
            (logits, features), masks = logits_and_features(self.model, images), ()
        else:
            return (self.model(images),)
        guard = () if self.guard is None else (self.guard(features),)
        return (logits, *guard, *masks)


def export_onnx(loaded: Predictor, path: Path) -> Path:
    """Write the torch model as fp32 ONNX: input ``images`` (N, 3, H, W), the outputs of
    :class:`ExportGraph`."""
    size = loaded.preprocessing.image_size
    graph = ExportGraph(loaded.model.to("cpu").eval(), loaded.engine.scope).eval()
    outputs = graph.output_names
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            graph,
            (torch.zeros(1, 3, size, size),),
            str(tmp),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
            opset_version=OPSET,
            dynamo=False,
        )
        _add_metadata(tmp, loaded)
    return path


class _CalibrationImages(CalibrationDataReader):
    """Calibration reader: one preprocessed image at a time; unreadable files are skipped."""

    def __init__(self, files: Sequence[InputLike], loaded: Predictor) -> None:
        self.transform = build_eval_transform(loaded.preprocessing)
        self.preprocessing = loaded.preprocessing
        self.files: Iterator[InputLike] = iter(files)

    def get_next(self) -> dict[str, np.ndarray] | None:
        for path in self.files:
            try:
                image = load_region(as_input(path), self.preprocessing)
                return {"images": self.transform(image)[None].numpy()}
            except (ImageDecodeError, BoxError) as exc:
                logger.warning("calibration: skipped %s", exc)
        return None


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Sequence[Path],
    loaded: Predictor,
    *,
    weight_bits: int = 7,
    keep_float: Sequence[str] = (),
) -> Path:
    """Static int8 quantization (QDQ; per-channel int8 weights, uint8 activations); the nodes
    whose names start with one of ``keep_float`` (e.g. ``/backbone.0``, ``/head``: mixed
    precision) stay in float, as does the out-of-scope guard.

    ``weight_bits=7`` (``reduce_range``) keeps weights to 7 bits: without it, CPUs lacking VNNI
    (AVX2 only) can saturate the 16-bit sums of u8 x s8 products. On BUSI (AVX2 CPU) it made the
    difference between a validation AUC drop of 0.013 with 96% decision agreement and no drop
    with 100% (VGG16). Compact networks lose more to the 7th bit: an EfficientNet-Lite0 agreed
    with fp32 on 89% of decisions with 7-bit weights and 97% with 8-bit
    (experiments/int8_lite.py). ``weight_bits=8`` marks the model as needing VNNI (or AMX):
    :func:`busdx.inference.predictor.load_model` uses it only on such a CPU.
    """
    if weight_bits not in {7, 8}:
        raise ExportError(f"int8 weights are 7 or 8 bits, got {weight_bits}")
    with tempfile.TemporaryDirectory() as folder, atomic_path(out_path) as tmp:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        in_float = (Guard.ONNX_PREFIX, *keep_float)
        excluded = [node.name for node in onnx.load(str(prepared)).graph.node
                    if node.name.startswith(in_float)]  # fmt: skip
        quantize_static(
            str(prepared),
            str(tmp),
            _CalibrationImages(calibration, loaded),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=weight_bits == 7,
            nodes_to_exclude=excluded,  # the out-of-scope distance stays in float
        )
        _add_metadata(tmp, loaded, weight_bits)
    return out_path


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: Sequence[int],
    predictor: Predictor,
) -> LogitComparison:
    """Decision agreement (each decided by ``predictor``'s calibration and threshold), largest
    logit difference and ROC AUC of two models' logits for the same images."""
    ref_pos, cand_pos = (
        predictor.decide(predictor.probabilities(logits)) for logits in (reference, candidate)
    )
    y = np.asarray(labels)
    try:
        auc_ref, auc_cand = roc_auc(y, reference), roc_auc(y, candidate)
    except SingleClassError:
        auc_ref = auc_cand = None
    return LogitComparison(
        n=len(y),
        agreement=float(np.mean(ref_pos == cand_pos)),
        max_abs_logit_difference=float(np.max(np.abs(reference - candidate))),
        roc_auc_reference=auc_ref,
        roc_auc_candidate=auc_cand,
        roc_auc_drop=None if auc_ref is None else auc_ref - auc_cand,
    )


def _writable(run_dir: Path) -> Path:
    """The run directory to export into: the run itself, or for a bundled model a copy of its
    model and config under ``busdx-output/NAME``."""
    if not is_bundled(run_dir):
        return run_dir
    home = output_home(run_dir)
    home.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, INFO_FILE, MODEL_FILE):
        shutil.copyfile(run_dir / name, home / name)
    logger.info("exporting a copy of the bundled model %s in %s", run_dir.name, home)
    return home


def _split(run_dir: Path, split: str) -> str:
    """``split`` of the run's own data; all of the given data for a run without a split (a
    bundled model, checked on the images given with ``--data``)."""
    return split if (run_dir / SPLIT_FILE).is_file() else "all"


def _calibration_files(
    run_dir: Path, calibration_dir: str | Path | None, data_root: str | Path | None, count: int
) -> list[InputLike]:
    if calibration_dir is not None:
        files = expand_paths([calibration_dir])
    else:
        config, info = load_run(run_dir)
        train = samples_for_split(run_dir, config, info, data_root, _split(run_dir, "train"))
        train = train.samples
        files = [sample.input for sample in train]
    if not files:
        raise DataError(f"no calibration images found in {calibration_dir}")
    return random.Random(0).sample(files, min(count, len(files)))


def export_run(
    run_dir: str | Path,
    *,
    int8: bool = False,
    calibration_dir: str | Path | None = None,
    calibration_size: int = 100,
    data_root: str | Path | None = None,
    max_auc_drop: float = 0.01,
    force: bool = False,
    weight_bits: int = 7,
    keep_float: Sequence[str] = (),
) -> ExportReport:
    """Export a run's ``model.pt`` to ONNX (and int8); returns what ``export.json`` records.

    A bundled model (``run_dir`` its name) is exported into a copy under
    ``busdx-output/NAME`` (the package is never written to), checked on ``data_root``."""
    run_dir = _writable(resolve_run(run_dir))
    loaded = load_model(run_dir, device="cpu")
    config, info = load_run(run_dir)
    if not int8 and (run_dir / INT8_FILE).is_file():
        (run_dir / INT8_FILE).unlink()  # made from an older model.pt: never let it answer
        logger.info("removed the older %s (export with --int8 to make a new one)", INT8_FILE)
    fp32_path = export_onnx(loaded, run_dir / ONNX_FILE)
    val = samples_for_split(run_dir, config, info, data_root, _split(run_dir, "val")).samples
    files, labels = [s.input for s in val], [s.label for s in val]
    torch_logits, fp32_logits = (
        file_logits(model, files, progress=False) for model in (loaded, load_model(fp32_path))
    )
    vs_torch = compare_logits(torch_logits, fp32_logits, labels, loaded)
    onnx = ExportedFile(file=ONNX_FILE, sha256=sha256_file(fp32_path), opset=OPSET,
                        vs_torch=vs_torch)  # fmt: skip
    int8_export = None
    if int8:
        calibration = _calibration_files(run_dir, calibration_dir, data_root, calibration_size)
        check = _quantize_checked(
            fp32_path, run_dir / INT8_FILE, calibration, loaded, weight_bits,
            reference=(fp32_logits, files, labels), max_auc_drop=max_auc_drop, force=force,
            keep_float=keep_float,
        )  # fmt: skip
        source = str(calibration_dir or "training split")
        int8_export = Int8Export(
            file=INT8_FILE, sha256=sha256_file(run_dir / INT8_FILE), weight_bits=weight_bits,
            kept_in_float=list(keep_float),
            calibration=CalibrationImages(source=source, images=len(calibration)),
            vs_fp32=check,
            accepted_auc_drop=check.roc_auc_drop is not None and check.roc_auc_drop > max_auc_drop,
        )  # fmt: skip
    report = ExportReport(busdx_version=__version__, environment=environment(),
                          source=str(loaded.path), onnx=onnx, int8=int8_export)  # fmt: skip
    report.write(run_dir / EXPORT_REPORT)
    return report


def _quantize_checked(
    fp32_path: Path,
    target: Path,
    calibration: Sequence[InputLike],
    loaded: Predictor,
    weight_bits: int,
    *,
    reference: tuple[np.ndarray, list, list[int]],
    max_auc_drop: float,
    force: bool,
    keep_float: Sequence[str] = (),
) -> LogitComparison:
    """Quantize to a candidate file, compare it with the fp32 logits on the validation images
    (``reference``: logits, inputs, labels) and move it to ``target`` only if it keeps the AUC
    (or ``force``). Returns the comparison."""
    fp32_logits, files, labels = reference
    candidate = target.with_name(".int8-candidate.onnx")
    try:
        quantize_int8(fp32_path, candidate, calibration, loaded, weight_bits=weight_bits,
                      keep_float=keep_float)  # fmt: skip
        int8_logits = file_logits(load_model(candidate), files, progress=False)
        check = compare_logits(fp32_logits, int8_logits, labels, loaded)
        drop = check.roc_auc_drop
        if drop is not None and drop > max_auc_drop and not force:
            raise ExportError(
                f"int8 lowers validation ROC AUC by {drop:.3f} (more than {max_auc_drop}); "
                "kept the fp32 model only. Calibrate on more images (--calibration-size), "
                "or accept it with --allow-auc-drop"
            )
        candidate.replace(target)
    finally:
        candidate.unlink(missing_ok=True)
    return check


def format_export(run_dir: str | Path, report: ExportReport) -> str:
    """Terminal summary of :func:`export_run`: each file written and how close it is to the
    model it replaces."""
    run_dir = Path(run_dir)
    check = report.onnx.vs_torch
    lines = [
        f"{run_dir / report.onnx.file}: fp32 ONNX; on {check.n} validation images "
        f"max |logit - torch| {check.max_abs_logit_difference:.2e}, "
        f"decision agreement {check.agreement:.3f}"
    ]
    if report.int8 is not None:
        check = report.int8.vs_fp32
        aucs = (check.roc_auc_reference, check.roc_auc_candidate, check.roc_auc_drop)
        auc_text = "ROC AUC fp32 {:.3f} -> int8 {:.3f} (drop {:+.3f})".format(*aucs)
        lines.append(
            f"{run_dir / report.int8.file}: int8 (calibrated on "
            f"{report.int8.calibration.images} images); decision agreement with fp32 "
            f"{check.agreement:.3f}; " + (auc_text if aucs[0] is not None else "no AUC")
        )
    kept = "int8" if report.int8 is not None else "fp32 ONNX"
    lines.append(
        f"report: {run_dir / EXPORT_REPORT}; busdx predict and serve use the {kept} model by "
        "default"
    )
    return "\n".join(lines)
