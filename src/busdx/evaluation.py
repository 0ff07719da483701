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

from busdx.adaptation import refit_head
from busdx.calibration import fit_operating_points
from busdx.config import EvaluateConfig
from busdx.data import Sample
from busdx.errors import DataError
from busdx.explain import explain_image
from busdx.fileio import atomic_write_text
from busdx.inference import file_logits, file_predictions
from busdx.metrics import (
    DECISION_METRICS,
    SCORE_METRICS,
    binary_metrics,
    bootstrap_ci,
    paired_bootstrap,
    reliability_bins,
    roc_band,
)
from busdx.predictor import Predictor
from busdx.readers import compare_with_readers
from busdx.reporting import (
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curve,
    plot_sample_predictions,
)
from busdx.training import MODEL_FILE, update_model_metadata
from busdx.transforms import load_region

__all__ = [
    "calibrate_model",
    "compare_evaluations",
    "evaluate_samples",
    "format_comparison",
    "format_metrics",
    "json_safe",
]

METRICS_FILE = "metrics.json"


def calibrate_model(
    run_dir: Path,
    loaded: Predictor,
    val_samples: list[Sample],
    settings: EvaluateConfig,
    *,
    source: str = "validation split",
    refit: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit temperature and thresholds on ``val_samples``; store them in ``run_dir/model.pt``.

    After training these are the validation split's images; ``busdx calibrate`` passes a new
    site's own labelled cases (``source`` then says so). With ``refit`` the head's last layer
    is refitted on them too (:func:`busdx.adaptation.refit_head`; cross-fitted threshold).
    """
    labels = np.array([s.label for s in val_samples])
    paths = [s.input for s in val_samples]
    updates = {}
    if refit:
        fitted, updates["state_dict"] = refit_head(
            loaded, paths, labels, settings, progress=progress
        )
    else:
        fitted = fit_operating_points(file_logits(loaded, paths, progress=progress), labels,
                                      settings)  # fmt: skip
    fitted["calibration_source"] = source
    update_model_metadata(run_dir / MODEL_FILE, {**fitted, **updates})
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


def _promise(metadata: dict[str, Any]) -> float | None:
    """The sensitivity the model's threshold was chosen to deliver (None for other policies)."""
    if metadata.get("threshold_policy") != "target_sensitivity":
        return None
    return metadata.get("target_sensitivity")


def _sample_indices(y_true: np.ndarray, called: np.ndarray, n: int = 12) -> list[int]:
    """A few of each class, errors first, so the grid shows what goes wrong."""
    wrong = called != y_true.astype(bool)
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


def _per_group(
    groups: list[str], y_true: np.ndarray, y_prob: np.ndarray, threshold: float,
    settings: EvaluateConfig,
) -> dict[str, Any]:  # fmt: skip
    """Metrics with CIs of each group (site, scanner); a group of one class has counts only."""
    table: dict[str, Any] = {}
    names = np.array(groups)
    for name in sorted(set(groups)):
        mask = names == name
        if len(set(y_true[mask])) < 2:
            table[name] = {"n": int(mask.sum()), "n_positive": int(y_true[mask].sum()),
                           "note": "one class only: no ROC AUC"}  # fmt: skip
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
) -> dict[str, Any]:
    """Evaluate ``samples``; write ``metrics.json``, ``predictions.csv`` and figures.

    Returns the metrics dict: malignant is the positive class; the headline numbers are at the
    model's own threshold, ``operating_points`` holds the same table at each candidate threshold.
    ``site`` names where the images come from (default: the data folder's name). With
    ``reader_ranks`` (the readers' BI-RADS rank of each sample) the model is compared with the
    readers (see :mod:`busdx.readers`) and the readers' ROC is drawn beside the model's.
    """
    if not samples:
        raise DataError(f"the {split} split is empty: nothing to evaluate")
    y_true = np.array([s.label for s in samples])
    rows = file_predictions(loaded, [s.input for s in samples], progress=progress)
    logits = np.array([row.logit for row in rows])
    flags = [row.out_of_scope for row in rows]
    y_prob = loaded.probabilities(logits)
    called = loaded.decide(y_prob)
    threshold = loaded.threshold
    points = dict(loaded.metadata.get("operating_points") or {"fixed": threshold})
    names = loaded.class_names
    result = {
        "site": site or data_root.name,
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
        "promised_sensitivity": _promise(loaded.metadata),
        "out_of_scope_rate": None if None in flags else float(np.mean(flags)),
        "model": {
            "busdx_version": loaded.metadata["busdx_version"],
            "weights": loaded.metadata["weights"],
            "epoch": loaded.metadata.get("epoch"),
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
            y_true,
            y_prob,
            reader_ranks,
            n_resamples=settings.n_bootstrap,
            level=settings.ci_level,
            seed=settings.seed,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(json_safe(result), indent=2) + "\n")

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["path", "label", "probability_malignant", "predicted", "logit", "out_of_scope", "site"]
    )
    for sample, score, positive, logit, flag in zip(
        samples, y_prob, called, logits, flags, strict=True
    ):
        writer.writerow(
            [
                sample.relpath,
                names[sample.label],
                f"{score:.6f}",
                names[int(positive)],
                f"{logit:.6f}",
                "" if flag is None else flag,
                sample.site,
            ]
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
    plot_roc_curve(
        y_true,
        y_prob,
        result,
        out_dir / "roc_curve.png",
        band=band,
        readers=None if reader_ranks is None else (reader_ranks, result["readers"]),
    )
    plot_reliability_diagram(result["reliability"], result["ece"], out_dir / "reliability.png")
    picked = _sample_indices(y_true, called)
    images = [load_region(samples[i].input, loaded.preprocessing) for i in picked]
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
        f"{result.get('site', '')} {result['split']} split: n={result['n']} "
        f"({result['n_positive']} {result['positive_class']}); 95% bootstrap CIs in brackets"
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
    if result.get("promised_sensitivity"):
        lines.append(
            f"  promised sensitivity {result['promised_sensitivity']:.2f}, achieved "
            f"{_with_ci(result, 'sensitivity')}"
        )
    if result.get("out_of_scope_rate") is not None:
        lines.append(f"  flagged out of scope {result['out_of_scope_rate']:.1%} of the images")
    for kind in ("site", "scanner"):
        for name, row in result.get(f"per_{kind}", {}).items():
            if "note" in row:
                lines.append(f"  {kind} {name} (n={row['n']}): {row['note']}")
                continue
            lines.append(
                f"  {kind} {name} (n={row['n']}): ROC AUC {_with_ci(row, 'roc_auc')}; at the "
                f"model's threshold sensitivity {_with_ci(row, 'sensitivity')}, specificity "
                f"{_with_ci(row, 'specificity')}"
            )
    if "readers" in result:
        lines += _format_readers(result["readers"])
    return "\n".join(lines)


def _format_readers(readers: dict[str, Any]) -> list[str]:
    delta = readers["delta_roc_auc"]
    auc_ci = readers["readers_roc_auc_ci"]
    lines = [
        f"  readers (BI-RADS) ROC AUC {readers['readers_roc_auc']:.3f} "
        f"[{auc_ci['low']:.3f}, {auc_ci['high']:.3f}]; model - readers "
        f"{delta['delta']:+.3f} [{delta['low']:+.3f}, {delta['high']:+.3f}] (paired bootstrap)"
    ]
    for name, point in readers["operating_points"].items():
        ours = point["delta_specificity"]
        lines.append(
            f"  readers {name}: sensitivity {point['readers']['sensitivity']:.3f}, specificity "
            f"{point['readers']['specificity']:.3f}; model at that sensitivity: specificity "
            f"{point['model_specificity_at_readers_sensitivity']:.3f} "
            f"(difference {ours['delta']:+.3f} [{ours['low']:+.3f}, {ours['high']:+.3f}])"
        )
    return lines


def _read_predictions(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[str, float, bool]]]:
    """An evaluation's metrics and ``{path: (label, probability, called positive)}``; for a
    ``busdx cv`` folder, every fold's test predictions (each at its fold's threshold)."""
    if (folder / "folds.csv").is_file():
        parts = [_read_predictions(fold) for fold in sorted(folder.glob("fold-*"))]
        if not parts:
            raise DataError(f"{folder} holds no finished fold (fold-*/): finish the CV first")
        rows = {path: row for _, fold_rows in parts for path, row in fold_rows.items()}
        return {**parts[0][0], "split": "cv out-of-fold"}, rows
    metrics_path, predictions_path = folder / METRICS_FILE, folder / "predictions.csv"
    if not metrics_path.is_file() or not predictions_path.is_file():
        raise DataError(
            f"{folder} holds no evaluation ({METRICS_FILE} + predictions.csv): give a run "
            "directory or an evaluation folder written by busdx evaluate"
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    with predictions_path.open(newline="", encoding="utf-8") as handle:
        rows = {
            row["path"]: (
                row["label"],
                float(row["probability_malignant"]),
                row["predicted"] == metrics["positive_class"],
            )
            for row in csv.DictReader(handle)
        }
    return metrics, rows


def compare_evaluations(
    folder_a: Path, folder_b: Path, settings: EvaluateConfig, *, out: Path | None = None
) -> dict[str, Any]:
    """Paired bootstrap of two models on the same images: ΔAUC and the difference in each
    decision metric at each model's own threshold (A - B).

    Each folder is an evaluation written by ``busdx evaluate``, a run directory (whose test
    evaluation is at its top) or a ``busdx cv`` folder (its pooled out-of-fold predictions:
    two CVs on the same folds compare paired); images are matched by path, and both must have
    scored the same set. Resamples are drawn per case, the same for both models, so the shared
    difficulty of the cases cancels out of the difference.
    """
    metrics_a, rows_a = _read_predictions(Path(folder_a))
    metrics_b, rows_b = _read_predictions(Path(folder_b))
    if set(rows_a) != set(rows_b):
        only = sorted(set(rows_a) ^ set(rows_b))
        raise DataError(
            f"{folder_a} and {folder_b} scored different images ({len(only)} not in both, e.g. "
            f"{only[0]!r}): evaluate both models on the same data and split"
        )
    paths = sorted(rows_a)
    if any(rows_a[p][0] != rows_b[p][0] for p in paths):
        raise DataError(f"{folder_a} and {folder_b} label some images differently")
    y_true = np.array([int(rows_a[p][0] == metrics_a["positive_class"]) for p in paths])
    columns = {
        name: np.array([[rows[p][1], rows[p][2]] for p in paths], dtype=float)
        for name, rows in (("a", rows_a), ("b", rows_b))
    }
    ci = dict(n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
    result: dict[str, Any] = {
        "a": {"folder": str(folder_a), "site": metrics_a.get("site"), "split": metrics_a["split"]},
        "b": {"folder": str(folder_b), "site": metrics_b.get("site"), "split": metrics_b["split"]},
        "n": len(paths),
        "n_positive": int(y_true.sum()),
        "roc_auc": paired_bootstrap(y_true, columns["a"][:, 0], columns["b"][:, 0], **ci),
    }
    for key in ("sensitivity", "specificity"):
        result[key] = paired_bootstrap(
            y_true,
            columns["a"][:, 1],
            columns["b"][:, 1],
            lambda y, s, k=key: binary_metrics(y, s, threshold=0.5)[k],
            **ci,
        )
    if out is not None:
        atomic_write_text(out, json.dumps(json_safe(result), indent=2) + "\n")
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """Terminal summary of :func:`compare_evaluations`."""
    lines = [
        f"A: {result['a']['folder']}\nB: {result['b']['folder']}",
        f"same {result['n']} images ({result['n_positive']} positive); A - B, 95% paired "
        "bootstrap CI, two-sided bootstrap p",
    ]
    for key in ("roc_auc", "sensitivity", "specificity"):
        d = result[key]
        lines.append(
            f"  {key:<12} A {d['a']:.3f}  B {d['b']:.3f}  difference {d['delta']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}]  p={d['p_value']:.3f}"
        )
    return "\n".join(lines)
