"""Score labelled images with a trained model and report every metric with its CI.

:func:`evaluate_samples` reports, on any labelled set, every metric at the model's chosen
threshold and at each candidate operating point, each with a seeded percentile-bootstrap
confidence interval, plus calibration (ECE, reliability diagram) and figures.
:func:`evaluate_run` is ``busdx evaluate``: it finds the run's data, split and readers first.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from busdx.bundled import output_home, resolve_run
from busdx.config import EvaluateConfig
from busdx.data.datasets import Sample
from busdx.data.preprocess import load_region
from busdx.errors import ConfigError, DataError
from busdx.evaluation.local_check import check_expectation, expectation, format_check
from busdx.evaluation.radiologists import compare_with_readers, reader_ranks
from busdx.evaluation.segmentation import score_lesions, summarise_lesions, write_lesions
from busdx.fileio import atomic_write_text
from busdx.inference.batch import file_predictions
from busdx.inference.predictor import Predictor, load_model
from busdx.layout import (
    CONFUSION_MATRIX,
    EVAL_DIR,
    GRADCAM_SAMPLES,
    LESIONS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RELIABILITY,
    ROC_CURVE,
    SAMPLE_PREDICTIONS,
)
from busdx.reporting.figures import (
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curve,
    plot_sample_predictions,
)
from busdx.results import Evaluation, Interval, Metrics, OneClassGroup, ReaderComparison
from busdx.runs import load_run, samples_for_split
from busdx.stats.metrics import (
    DECISION_METRICS,
    SCORE_METRICS,
    binary_metrics,
    bootstrap_ci,
    reliability_bins,
    roc_band,
)

__all__ = ["evaluate_run", "evaluate_samples", "evaluation_name", "format_metrics"]


def _sample_indices(y_true: np.ndarray, called: np.ndarray, n: int = 12) -> list[int]:
    """A few of each class, errors first, so the grid shows what goes wrong."""
    wrong = called != y_true.astype(bool)
    order = np.lexsort((np.arange(len(y_true)), ~wrong))
    picked: list[int] = []
    for label in (0, 1):
        picked += [int(i) for i in order if y_true[i] == label][: n // 2]
    return sorted(picked, key=lambda i: (not wrong[i], i))


def _metrics_with_ci(y_true, y_prob, threshold: float, settings: EvaluateConfig) -> Metrics:
    ci = bootstrap_ci(
        y_true,
        y_prob,
        threshold=threshold,
        n_resamples=settings.n_bootstrap,
        level=settings.ci_level,
        seed=settings.seed,
    )
    return Metrics.model_validate({**binary_metrics(y_true, y_prob, threshold=threshold), "ci": ci})


def _per_group(
    groups: list[str], y_true: np.ndarray, y_prob: np.ndarray, threshold: float,
    settings: EvaluateConfig,
) -> dict[str, Metrics | OneClassGroup]:  # fmt: skip
    """Metrics with CIs of each group (site, scanner); a group of one class has counts only."""
    table: dict[str, Metrics | OneClassGroup] = {}
    names = np.array(groups)
    for name in sorted(set(groups)):
        mask = names == name
        if len(set(y_true[mask])) < 2:
            table[name] = OneClassGroup(n=int(mask.sum()), n_positive=int(y_true[mask].sum()),
                                        note="one class only: no ROC AUC")  # fmt: skip
        else:
            table[name] = _metrics_with_ci(y_true[mask], y_prob[mask], threshold, settings)
    return table


def evaluate_samples(
    loaded: Predictor,
    samples: list[Sample],
    out_dir: Path,
    *,
    split: str,
    data_root: Path,
    settings: EvaluateConfig,
    site: str | None = None,
    reader_ranks: np.ndarray | None = None,
    progress: bool = True,
    expected: dict[str, dict[str, Any]] | None = None,
) -> Evaluation:
    """Evaluate ``samples``; write ``metrics.json``, ``predictions.csv`` and figures.

    Returns the :class:`~busdx.results.Evaluation` written to ``metrics.json``: malignant is
    the positive class; the headline numbers are at the model's own threshold,
    ``operating_points`` holds the same table at each candidate threshold.
    ``site`` names where the images come from (default: the data folder's name). With
    ``reader_ranks`` (the readers' BI-RADS rank of each sample) the model is compared with the
    readers (see :mod:`busdx.evaluation.radiologists`) and the readers' ROC is drawn beside the
    model's. ``expected``: the held-out hospitals of the model's leave-one-site-out study, beside
    which the result is set (:func:`busdx.evaluation.local_check.check_expectation`).
    """
    if not samples:
        raise DataError(f"the {split} split is empty: nothing to evaluate")
    scores = _score(loaded, samples, progress=progress)
    place = {"site": site or data_root.name, "split": split, "data": str(data_root)}
    result = _metrics_tables(loaded, samples, scores, settings, reader_ranks, place)
    out_dir.mkdir(parents=True, exist_ok=True)
    if loaded.outlines and any(s.masks for s in samples):  # the mask head against the readers
        lesions = score_lesions(loaded, samples, progress=progress)
        write_lesions(out_dir / LESIONS_FILE, lesions)
        summary = summarise_lesions(lesions, n_resamples=settings.n_bootstrap,
                                    level=settings.ci_level, seed=settings.seed)  # fmt: skip
        result = result.model_copy(update={"segmentation": summary})
    if expected:
        result = result.model_copy(update={"expected": check_expectation(result, expected)})
    result.write(out_dir / METRICS_FILE)
    _write_predictions(out_dir / PREDICTIONS_FILE, samples, scores, loaded.class_names)
    _plot_evaluation(out_dir, loaded, samples, scores, result, settings, reader_ranks)
    return result


@dataclass(frozen=True)
class _Scores:
    """The model's outputs on the evaluated samples, in their order."""

    y_true: np.ndarray
    logits: np.ndarray
    y_prob: np.ndarray
    called: np.ndarray  # decided malignant at the model's threshold
    out_of_scope: list[bool | None]


def _score(loaded: Predictor, samples: list[Sample], *, progress: bool) -> _Scores:
    rows = file_predictions(loaded, [s.input for s in samples], progress=progress)
    logits = np.array([row.logit for row in rows])
    y_prob = loaded.probabilities(logits)
    return _Scores(
        y_true=np.array([s.label for s in samples]),
        logits=logits,
        y_prob=y_prob,
        called=loaded.decide(y_prob),
        out_of_scope=[row.out_of_scope for row in rows],
    )


def _metrics_tables(
    loaded: Predictor,
    samples: list[Sample],
    scores: _Scores,
    settings: EvaluateConfig,
    reader_ranks: np.ndarray | None,
    place: dict[str, str],
) -> Evaluation:
    """Every metric with its CI: at the model's threshold, at each candidate operating point,
    by site and scanner, and against the readers; ``place`` names the site, split and data."""
    y_true, y_prob, threshold = scores.y_true, scores.y_prob, loaded.threshold
    calibration, provenance = loaded.info.calibration, loaded.info.provenance
    points = dict((calibration and calibration.operating_points) or {"fixed": threshold})
    flags = scores.out_of_scope
    result: dict[str, Any] = {
        **place,
        "positive_class": loaded.class_names[1],
        "threshold_policy": calibration.threshold_policy if calibration else "fixed",
        "ci_level": settings.ci_level,
        **_metrics_with_ci(y_true, y_prob, threshold, settings).model_dump(),
        "calibrated": loaded.calibrated,
        "temperature": loaded.temperature,
        "reliability": reliability_bins(y_true, y_prob),
        "operating_points": {
            name: _metrics_with_ci(y_true, y_prob, t, settings) for name, t in points.items()
        },
        "promised_sensitivity": calibration.promised_sensitivity if calibration else None,
        "out_of_scope_rate": None if None in flags else float(np.mean(flags)),
        "model": {
            "busdx_version": provenance.busdx_version,
            "weights": provenance.weights,
            "epoch": provenance.epoch,
        },
    }
    sites = [s.site for s in samples]
    if len(set(sites)) > 1:  # several sites: each one's own table, never only the pooled one
        result["per_site"] = _per_group(sites, y_true, y_prob, threshold, settings)
    if any(s.scanner for s in samples):  # a table named the scanners: each one's own table too
        scanners = [s.scanner or "unknown" for s in samples]
        result["per_scanner"] = _per_group(scanners, y_true, y_prob, threshold, settings)
    if reader_ranks is not None:
        result["readers"] = compare_with_readers(
            y_true, y_prob, reader_ranks, n_resamples=settings.n_bootstrap,
            level=settings.ci_level, seed=settings.seed,
        )  # fmt: skip
    return Evaluation.model_validate(result)


PREDICTION_COLUMNS = (
    "path", "label", "probability_malignant", "predicted", "logit", "out_of_scope", "site",
)  # fmt: skip


def _write_predictions(
    path: Path, samples: list[Sample], scores: _Scores, names: Sequence[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for i, sample in enumerate(samples):
        flag = scores.out_of_scope[i]
        writer.writerow([
            sample.relpath, names[sample.label], f"{scores.y_prob[i]:.6f}",
            names[int(scores.called[i])], f"{scores.logits[i]:.6f}",
            "" if flag is None else flag, sample.site,
        ])  # fmt: skip
    atomic_write_text(path, buffer.getvalue())


def _plot_evaluation(
    out_dir: Path,
    loaded: Predictor,
    samples: list[Sample],
    scores: _Scores,
    result: Evaluation,
    settings: EvaluateConfig,
    reader_ranks: np.ndarray | None,
) -> None:
    """Confusion matrix, ROC with its bootstrap band (and the readers'), reliability diagram,
    a grid of sample predictions and, with a torch model, their Grad-CAM."""
    y_true, y_prob, names = scores.y_true, scores.y_prob, loaded.class_names
    band = roc_band(y_true, y_prob, n_resamples=settings.n_bootstrap, level=settings.ci_level,
                    seed=settings.seed)  # fmt: skip
    plot_confusion_matrix(result.confusion, names, out_dir / CONFUSION_MATRIX)
    readers = (
        None if reader_ranks is None or result.readers is None else (reader_ranks, result.readers)
    )
    plot_roc_curve(y_true, y_prob, result.operating_points, out_dir / ROC_CURVE,
                   title=f"ROC curve {result.site} {result.split}", band=band, readers=readers,
                   ci_level=settings.ci_level)  # fmt: skip
    plot_reliability_diagram(result.reliability, result.ece, out_dir / RELIABILITY)
    picked = _sample_indices(y_true, scores.called)
    images = [load_region(samples[i].input, loaded.preprocessing) for i in picked]
    shown = {"true_labels": [names[y_true[i]] for i in picked],
             "probabilities": [float(y_prob[i]) for i in picked],
             "threshold": loaded.threshold, "class_names": names}  # fmt: skip
    plot_sample_predictions(images, **shown, path=out_dir / SAMPLE_PREDICTIONS)
    if loaded.model is not None:  # Grad-CAM needs the torch model (and so, torch)
        from busdx.networks.gradcam import explain_image

        overlays = [explain_image(loaded, image).overlay for image in images]
        plot_sample_predictions(overlays, **shown, path=out_dir / GRADCAM_SAMPLES,
                                title="Grad-CAM: where the model found its evidence")  # fmt: skip


def evaluation_name(
    site: str, split: str, backend: str = "torch", precision: str = "fp32", flip: bool = False
) -> str:
    """The folder name of an evaluation under ``RUNDIR/eval/``: ``<site>-<split>``, with
    ``-onnx`` or ``-<precision>`` when not the fp32 torch model and ``-flip`` with flip
    test-time augmentation."""
    variant = "-onnx" if backend == "onnx" else "" if precision == "fp32" else f"-{precision}"
    return f"{site}-{split}{variant}{'-flip' if flip else ''}"


def evaluate_run(
    run_dir: str | Path,
    data: Sequence[str] | None = None,
    split: str | None = None,
    *,
    site: str | None = None,
    out: str | Path | None = None,
    readers: str | Path | None = None,
    reader_column: str = "birads",
    boxes: str | None = None,
    device: str = "auto",
    backend: str = "torch",
    precision: str = "fp32",
    flip: bool = False,
    progress: bool = True,
) -> tuple[Evaluation, Path]:
    """``busdx evaluate``: a run's best model on a split of its own data or of ``data``.

    ``run_dir`` may be a bundled model's name. ``split=None``: the test split of the run's
    own data, all of data it never saw. Writes into ``out`` (default
    ``RUNDIR/eval/<site>-<split>``; ``busdx-output/NAME/eval/...`` for a bundled model, whose
    package is never written to) and returns the metrics and that folder. ``readers`` is a
    CSV of the readers' BI-RADS per image (default: the labels table, see
    :func:`busdx.evaluation.radiologists.reader_ranks`); ``boxes`` a lesion-box CSV for an ROI
    model; ``flip`` averages each answer with the mirrored image's (test-time augmentation).
    """
    run_dir = resolve_run(run_dir)
    config, info = load_run(run_dir)
    if boxes:
        if config.data.region != "box":
            raise ConfigError("--boxes is for a model trained on lesion boxes (data.region: box)")
        config.data.boxes = boxes
    dataset = samples_for_split(run_dir, config, info, data, split)
    site, split = site or dataset.site, dataset.split
    name = evaluation_name(site, split, backend, precision, flip)
    out = Path(out) if out else output_home(run_dir) / EVAL_DIR / name
    loaded = load_model(run_dir, device=device, backend=backend, precision=precision, flip=flip)
    ranks = reader_ranks(dataset.samples, dataset.root, readers, reader_column)
    result = evaluate_samples(
        loaded, dataset.samples, out, split=split, data_root=dataset.root,
        settings=config.evaluate, site=site, reader_ranks=ranks, progress=progress,
        expected=expectation(run_dir),
    )  # fmt: skip
    return result, out


def _with_ci(metrics: Metrics, key: str) -> str:
    """``value [low, high]``, or n/a for an undefined metric."""
    value = getattr(metrics, key)
    if math.isnan(value):
        return "n/a"
    ci: Interval | None = metrics.ci.get(key)
    return f"{value:.3f}" + (f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else "")


def format_metrics(result: Evaluation) -> str:
    """A compact, aligned text table for the terminal, with the bootstrap CIs."""
    lines = [
        f"{result.site} {result.split} split: n={result.n} ({result.n_positive} "
        f"{result.positive_class}); {result.ci_level:.0%} bootstrap CIs in brackets"
    ]
    for key in SCORE_METRICS:
        lines.append(f"  {key:<18} {_with_ci(result, key)}")
    for name, point in result.operating_points.items():
        chosen = "  <- model's threshold" if point.threshold == result.threshold else ""
        c = point.confusion
        lines.append(f"  at {name} threshold {point.threshold:.3f}{chosen}")
        for key in DECISION_METRICS:
            lines.append(f"    {key:<18} {_with_ci(point, key)}")
        lines.append(f"    confusion          TP {c.tp}  FP {c.fp}  TN {c.tn}  FN {c.fn}")
    if result.promised_sensitivity:
        lines.append(
            f"  promised sensitivity {result.promised_sensitivity:.2f}, achieved "
            f"{_with_ci(result, 'sensitivity')}"
        )
    if result.out_of_scope_rate is not None:
        lines.append(f"  not a scan (no label): {result.out_of_scope_rate:.1%} of the images")
    for kind, table in (("site", result.per_site), ("scanner", result.per_scanner)):
        for name, row in (table or {}).items():
            if isinstance(row, OneClassGroup):
                lines.append(f"  {kind} {name} (n={row.n}): {row.note}")
                continue
            lines.append(
                f"  {kind} {name} (n={row.n}): ROC AUC {_with_ci(row, 'roc_auc')}; at the "
                f"model's threshold sensitivity {_with_ci(row, 'sensitivity')}, specificity "
                f"{_with_ci(row, 'specificity')}"
            )
    if result.readers is not None:
        lines += _format_readers(result.readers)
    if result.expected is not None:
        lines += format_check(result.expected)
    if result.segmentation is not None:
        seg = result.segmentation
        lines.append(
            f"  outlines vs the readers' masks (n={seg.n}): Dice {seg.dice:.3f} "
            f"[{seg.dice_ci[0]:.3f}, {seg.dice_ci[1]:.3f}], IoU {seg.iou:.3f}; nothing outlined "
            f"in {seg.n - seg.outlined}"
        )
    return "\n".join(lines)


def _format_readers(readers: ReaderComparison) -> list[str]:
    delta, auc_ci = readers.delta_roc_auc, readers.readers_roc_auc_ci
    lines = [
        f"  readers (BI-RADS) ROC AUC {readers.readers_roc_auc:.3f} "
        f"[{auc_ci.low:.3f}, {auc_ci.high:.3f}]; model - readers "
        f"{delta.delta:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}] (paired bootstrap)"
    ]
    for name, point in readers.operating_points.items():
        ours = point.delta_specificity
        lines.append(
            f"  readers {name}: sensitivity {point.readers['sensitivity']:.3f}, specificity "
            f"{point.readers['specificity']:.3f}; model at that sensitivity: specificity "
            f"{point.model_specificity_at_readers_sensitivity:.3f} "
            f"(difference {ours.delta:+.3f} [{ours.low:+.3f}, {ours.high:+.3f}])"
        )
    return lines
