"""Score labelled images with a trained model; calibrate on validation; report with CIs.

``calibrate_model`` fits temperature scaling and the decision thresholds on the validation split
and stores them in ``model.pt``. ``evaluate_samples`` reports, on any labelled set, every metric
at the model's chosen threshold and at each candidate operating point, each with a seeded
percentile-bootstrap confidence interval, plus calibration (ECE, reliability diagram) and figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from busdx.calibration import apply_temperature, fit_operating_points
from busdx.config import EvaluateConfig
from busdx.data import Sample
from busdx.errors import DataError
from busdx.explain import explain_image
from busdx.fileio import atomic_write_text
from busdx.imaging import load_image
from busdx.inference import LoadedModel, file_logits
from busdx.metrics import (
    DECISION_METRICS,
    SCORE_METRICS,
    binary_metrics,
    bootstrap_ci,
    reliability_bins,
    roc_band,
)
from busdx.reporting import (
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curve,
    plot_sample_predictions,
)
from busdx.training import MODEL_FILE, update_model_metadata

__all__ = ["calibrate_model", "evaluate_samples", "format_metrics", "json_safe"]

METRICS_FILE = "metrics.json"


def calibrate_model(
    run_dir: Path,
    loaded: LoadedModel,
    val_samples: list[Sample],
    settings: EvaluateConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit temperature and thresholds on validation data; store them in ``run_dir/model.pt``."""
    labels = np.array([s.label for s in val_samples])
    fitted = fit_operating_points(
        file_logits(loaded, [s.path for s in val_samples], progress=progress), labels, settings
    )
    update_model_metadata(run_dir / MODEL_FILE, fitted)
    loaded.metadata.update(fitted)
    return fitted


def json_safe(value: Any) -> Any:
    """NaN (undefined ratios) becomes null, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
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


def _metrics_with_ci(y_true, y_prob, threshold: float, settings: EvaluateConfig) -> dict[str, Any]:
    metrics = binary_metrics(y_true, y_prob, threshold=threshold)
    metrics["ci"] = bootstrap_ci(
        y_true,
        y_prob,
        threshold=threshold,
        n_resamples=settings.n_bootstrap,
        level=settings.ci_level,
        seed=settings.seed,
    )
    return metrics


def evaluate_samples(
    loaded: LoadedModel,
    samples: list[Sample],
    out_dir: Path,
    *,
    split: str,
    data_root: Path,
    settings: EvaluateConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``samples``; write ``metrics.json``, ``predictions.csv`` and figures.

    Returns the metrics dict: malignant is the positive class; the headline numbers are at the
    model's own threshold, ``operating_points`` holds the same table at each candidate threshold.
    """
    if not samples:
        raise DataError(f"the {split} split is empty: nothing to evaluate")
    y_true = np.array([s.label for s in samples])
    logits = file_logits(loaded, [s.path for s in samples], progress=progress)
    y_prob = apply_temperature(logits, loaded.temperature)
    threshold = loaded.threshold
    points = dict(loaded.metadata.get("operating_points") or {"fixed": threshold})
    names = loaded.class_names
    result = {
        "split": split,
        "data": str(data_root),
        "positive_class": names[1],
        "threshold_policy": loaded.metadata.get("threshold_policy", "fixed"),
        **_metrics_with_ci(y_true, y_prob, threshold, settings),
        "calibrated": "temperature" in loaded.metadata,
        "temperature": loaded.temperature,
        "reliability": reliability_bins(y_true, y_prob),
        "operating_points": {
            name: _metrics_with_ci(y_true, y_prob, t, settings) for name, t in points.items()
        },
        "model": {
            "busdx_version": loaded.metadata["busdx_version"],
            "weights": loaded.metadata["weights"],
            "epoch": loaded.metadata.get("epoch"),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(json_safe(result), indent=2) + "\n")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "probability_malignant", "predicted"])
    for sample, score in zip(samples, y_prob, strict=True):
        writer.writerow(
            [sample.relpath, names[sample.label], f"{score:.6f}", names[int(score >= threshold)]]
        )
    atomic_write_text(out_dir / "predictions.csv", buffer.getvalue())

    band = roc_band(
        y_true,
        y_prob,
        n_resamples=settings.n_bootstrap,
        level=settings.ci_level,
        seed=settings.seed,
    )
    plot_confusion_matrix(result["confusion"], names, out_dir / "confusion_matrix.png")
    plot_roc_curve(y_true, y_prob, result, out_dir / "roc_curve.png", band=band)
    plot_reliability_diagram(result["reliability"], result["ece"], out_dir / "reliability.png")
    picked = _sample_indices(y_true, y_prob, threshold)
    images = [load_image(samples[i].path) for i in picked]
    shown = {"true_labels": [names[y_true[i]] for i in picked],
             "probabilities": [float(y_prob[i]) for i in picked],
             "threshold": threshold, "class_names": names}  # fmt: skip
    plot_sample_predictions(images, **shown, path=out_dir / "sample_predictions.png")
    if loaded.model is not None:  # Grad-CAM needs the torch model
        overlays = [explain_image(loaded, image).overlay for image in images]
        plot_sample_predictions(overlays, **shown, path=out_dir / "gradcam_samples.png",
                                title="Grad-CAM: where the model found its evidence")  # fmt: skip
    return result


def _with_ci(result: dict[str, Any], key: str) -> str:
    value = result[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ci = result.get("ci", {}).get(key)
    return f"{value:.3f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "")


def format_metrics(result: dict[str, Any]) -> str:
    """A compact, aligned text table for the terminal, with 95% CIs."""
    lines = [
        f"{result['split']} split: n={result['n']} ({result['n_positive']} "
        f"{result['positive_class']}); 95% bootstrap CIs in brackets"
    ]
    for key in SCORE_METRICS:
        lines.append(f"  {key:<18} {_with_ci(result, key)}")
    for name, point in result["operating_points"].items():
        chosen = "  <- model's threshold" if point["threshold"] == result["threshold"] else ""
        c = point["confusion"]
        lines.append(f"  at {name} threshold {point['threshold']:.3f}{chosen}")
        for key in DECISION_METRICS:
            lines.append(f"    {key:<18} {_with_ci(point, key)}")
        lines.append(
            f"    confusion          TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}"
        )
    return "\n".join(lines)
