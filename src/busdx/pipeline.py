"""Whole workflows built from the pieces: train-and-evaluate one run, and cross-validation."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from busdx.config import Config
from busdx.data import LabelledDataset, draw_split
from busdx.errors import DataError
from busdx.evaluation import calibrate_model, evaluate_samples, json_safe
from busdx.fileio import atomic_write_text
from busdx.inference import load_model
from busdx.metrics import (
    DECISION_METRICS,
    SCORE_METRICS,
    binary_metrics,
    bootstrap_ci,
    roc_band,
)
from busdx.reporting import plot_roc_curve, plot_training_curves
from busdx.runs import save_run
from busdx.training import fit

__all__ = ["cross_validate", "format_cv", "train_and_evaluate"]

logger = logging.getLogger(__name__)


def train_and_evaluate(
    config: Config, dataset: LabelledDataset, run_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume), plot the curves, calibrate on val, evaluate on test (val if none)."""
    logger.info(
        "data %s (%s): %s",
        dataset.root,
        dataset.layout,
        "; ".join(f"{split} {row}" for split, row in sorted(dataset.counts().items())),
    )
    started = time.perf_counter()
    history = fit(config, dataset, run_dir, progress=progress)
    logger.info("training took %.0f s", time.perf_counter() - started)
    plot_training_curves([asdict(r) for r in history], run_dir / "training_curves.png")
    loaded = load_model(run_dir)
    fitted = calibrate_model(
        run_dir, loaded, dataset.subset("val"), config.evaluate, progress=progress
    )
    logger.info(
        "calibrated on validation: temperature %.3f; threshold %.3f (%s)",
        fitted["temperature"],
        fitted["threshold"],
        fitted["threshold_policy"],
    )
    split = "test" if dataset.subset("test") else "val"
    return evaluate_samples(
        loaded,
        dataset.subset(split),
        run_dir,
        split=split,
        data_root=dataset.root,
        settings=config.evaluate,
        progress=progress,
    )


def _assign_folds(dataset: LabelledDataset, n_folds: int, seed: int) -> list[int]:
    labels = np.array([s.label for s in dataset.samples])
    groups = np.array([i if s.group is None else s.group for i, s in enumerate(dataset.samples)])
    if min(np.bincount(labels, minlength=2)) < n_folds:
        raise DataError(f"each class needs at least {n_folds} images for {n_folds} folds")
    folds = np.zeros(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test_index) in enumerate(splitter.split(labels, labels, groups)):
        folds[test_index] = fold
    return folds.tolist()


def _fold_dataset(
    dataset: LabelledDataset, folds: list[int], fold: int, config: Config
) -> LabelledDataset:
    test = [
        replace(s, split="test") for s, f in zip(dataset.samples, folds, strict=True) if f == fold
    ]
    rest = [s for s, f in zip(dataset.samples, folds, strict=True) if f != fold]
    groups = [i if s.group is None else s.group for i, s in enumerate(rest)]
    rest = draw_split(
        rest,
        val_fraction=config.data.val_fraction,
        test_fraction=0.0,
        seed=config.train.seed + fold,
        groups=groups,
    )
    return replace(dataset, samples=sorted(rest + test, key=lambda s: s.relpath))


def cross_validate(
    config: Config,
    dataset: LabelledDataset,
    out_dir: Path,
    *,
    n_folds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Grouped, stratified k-fold cross-validation; per-fold and pooled metrics with CIs.

    Near-duplicate groups stay within one fold. Each fold trains on the other folds (minus a
    grouped validation split used for checkpoint selection, calibration and the threshold) and
    is tested once. Folds with a ``metrics.json`` are skipped, so an interrupted run resumes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = _assign_folds(dataset, n_folds, config.train.seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "group", "fold"])
    for sample, fold in zip(dataset.samples, folds, strict=True):
        writer.writerow([sample.relpath, dataset.class_names[sample.label], sample.group, fold])
    atomic_write_text(out_dir / "folds.csv", buffer.getvalue())

    per_fold, y_true, y_prob, decisions = [], [], [], []
    for fold in range(n_folds):
        fold_dir = out_dir / f"fold-{fold}"
        fold_data = _fold_dataset(dataset, folds, fold, config)
        if (fold_dir / "metrics.json").is_file():
            result = json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))
        else:
            fold_dir.mkdir(exist_ok=True)
            if not (fold_dir / "run.json").is_file():
                save_run(fold_dir, config, fold_data)
            logger.info("fold %d/%d", fold + 1, n_folds)
            result = train_and_evaluate(config, fold_data, fold_dir, progress=progress)
        per_fold.append(result)
        with (fold_dir / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        y_true += [dataset.class_names.index(r["label"]) for r in rows]
        y_prob += [float(r["probability_malignant"]) for r in rows]
        decisions += [float(r["predicted"] == dataset.class_names[1]) for r in rows]
    return _summarise(
        config, per_fold, np.array(y_true), np.array(y_prob), np.array(decisions), out_dir
    )


FOLD_KEYS = SCORE_METRICS + DECISION_METRICS


def _summarise(config, per_fold, y_true, y_prob, decisions, out_dir) -> dict[str, Any]:
    settings = config.evaluate
    ci = dict(n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
    ranking = binary_metrics(y_true, y_prob)  # threshold-free metrics of the pooled scores
    ranking_ci = bootstrap_ci(y_true, y_prob, threshold=0.5, **ci)
    decided = binary_metrics(y_true, decisions)  # each fold at its own validation threshold
    decided_ci = bootstrap_ci(y_true, decisions, threshold=0.5, **ci)
    pooled = {key: ranking[key] for key in SCORE_METRICS}
    pooled |= {key: decided[key] for key in DECISION_METRICS}
    pooled_ci = {key: ranking_ci[key] for key in SCORE_METRICS}
    pooled_ci |= {key: decided_ci[key] for key in DECISION_METRICS}
    table = {key: [fold[key] for fold in per_fold] for key in FOLD_KEYS}
    summary = {
        "folds": len(per_fold),
        "n": len(y_true),
        "n_positive": int(y_true.sum()),
        "threshold_policy": settings.threshold_policy,
        "pooled": pooled,
        "pooled_ci": pooled_ci,
        "pooled_confusion": decided["confusion"],
        "per_fold": table,
        "mean": {k: float(np.nanmean(np.array(v, dtype=float))) for k, v in table.items()},
        "sd": {k: float(np.nanstd(np.array(v, dtype=float), ddof=1)) for k, v in table.items()},
    }
    atomic_write_text(out_dir / "cv_metrics.json", json.dumps(json_safe(summary), indent=2) + "\n")
    plot_roc_curve(
        y_true,
        y_prob,
        {
            **ranking,
            "operating_points": {"each fold at its own threshold": {**decided, "threshold": None}},
        },
        out_dir / "cv_roc_curve.png",
        band=roc_band(y_true, y_prob, **ci),
    )
    return summary


def format_cv(summary: dict[str, Any]) -> str:
    """Terminal table: pooled value with CI, and mean ± sd over folds."""
    lines = [
        f"{summary['folds']}-fold grouped CV: n={summary['n']} ({summary['n_positive']} "
        f"positive); pooled [95% CI]  |  mean ± sd over folds"
    ]
    for key, value in summary["pooled"].items():
        ci = summary["pooled_ci"][key]
        spread = (
            f"{summary['mean'][key]:.3f} ± {summary['sd'][key]:.3f}"
            if key in summary["mean"]
            else ""
        )
        lines.append(f"  {key:<18} {value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]  |  {spread}")
    return "\n".join(lines)
