"""Score a labelled split with a trained model and write metrics, per-image scores and figures."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from busdx.data import Sample
from busdx.errors import DataError
from busdx.fileio import atomic_write_text
from busdx.imaging import load_image
from busdx.inference import LoadedModel, predict_files
from busdx.metrics import binary_metrics
from busdx.reporting import plot_confusion_matrix, plot_roc_curve, plot_sample_predictions

__all__ = ["evaluate_samples", "format_metrics", "score_samples"]

METRICS_FILE = "metrics.json"


def score_samples(
    loaded: LoadedModel, samples: list[Sample], *, progress: bool = True
) -> np.ndarray:
    """Probability of the positive class for each sample, in order."""
    rows = list(predict_files(loaded, [s.path for s in samples], progress=progress))
    failed = [row.error for row in rows if row.error]
    if failed:
        raise DataError(f"{len(failed)} evaluation image(s) could not be read, e.g. {failed[0]}")
    return np.array([row.probability for row in rows])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _sample_indices(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float, n: int = 12
) -> list[int]:
    """A few of each class, errors first, so the grid shows what goes wrong."""
    wrong = (y_score >= threshold) != y_true.astype(bool)
    order = np.lexsort((np.arange(len(y_true)), ~wrong))
    picked: list[int] = []
    for label in (0, 1):
        picked += [int(i) for i in order if y_true[i] == label][: n // 2]
    return sorted(picked, key=lambda i: (not wrong[i], i))


def evaluate_samples(
    loaded: LoadedModel,
    samples: list[Sample],
    out_dir: Path,
    *,
    split: str,
    data_root: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``samples`` and write ``metrics.json``, ``predictions.csv`` and figures.

    Returns the metrics dict (malignant is the positive class; threshold from the model).
    """
    if not samples:
        raise DataError(f"the {split} split is empty: nothing to evaluate")
    y_true = np.array([s.label for s in samples])
    y_score = score_samples(loaded, samples, progress=progress)
    threshold = loaded.threshold
    metrics = binary_metrics(y_true, y_score, threshold=threshold)
    names = loaded.class_names
    result = {
        "split": split,
        "data": str(data_root),
        "positive_class": names[1],
        **metrics,
        "model": {
            "busdx_version": loaded.metadata["busdx_version"],
            "weights": loaded.metadata["weights"],
            "epoch": loaded.metadata.get("epoch"),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(_json_safe(result), indent=2) + "\n")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "probability_malignant", "predicted"])
    for sample, score in zip(samples, y_score, strict=True):
        writer.writerow(
            [sample.relpath, names[sample.label], f"{score:.6f}", names[int(score >= threshold)]]
        )
    atomic_write_text(out_dir / "predictions.csv", buffer.getvalue())

    plot_confusion_matrix(metrics["confusion"], names, out_dir / "confusion_matrix.png")
    plot_roc_curve(y_true, y_score, metrics, out_dir / "roc_curve.png")
    picked = _sample_indices(y_true, y_score, threshold)
    plot_sample_predictions(
        [load_image(samples[i].path) for i in picked],
        [names[y_true[i]] for i in picked],
        [float(y_score[i]) for i in picked],
        threshold=threshold,
        class_names=names,
        path=out_dir / "sample_predictions.png",
    )
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """A compact, aligned text table for the terminal."""
    c = result["confusion"]
    lines = [
        f"{result['split']} split: n={result['n']} ({result['n_positive']} "
        f"{result['positive_class']}), threshold {result['threshold']:.2f}"
    ]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "roc_auc",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
    ):
        value = result[key]
        lines.append(
            f"  {key:<18} {'n/a' if value is None or math.isnan(value) else f'{value:.3f}'}"
        )
    lines.append(f"  confusion          TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
    return "\n".join(lines)
