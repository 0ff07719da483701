"""Binary classification metrics with their clinical definitions (numpy only).

The positive class (label 1) is malignant. A prediction is positive when its probability is at
or above the threshold. Ratios whose denominator is zero (e.g. PPV with no positive calls) are
NaN, reported as ``null`` in JSON; a label set with a single class raises
:class:`SingleClassError` because ROC AUC, sensitivity or specificity would be undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from busdx.errors import DataError, SingleClassError

__all__ = [
    "DECISION_METRICS",
    "SCORE_METRICS",
    "average_precision",
    "binary_metrics",
    "bootstrap_ci",
    "brier_score",
    "confusion_counts",
    "expected_calibration_error",
    "is_positive",
    "paired_bootstrap",
    "reliability_bins",
    "roc_auc",
    "roc_band",
    "roc_curve",
    "sensitivity_lower_bound",
    "threshold_for_sensitivity",
    "youden_threshold",
]


def _check(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=float).ravel()
    if y_true.shape != y_score.shape:
        raise DataError(f"labels and scores differ in length: {len(y_true)} vs {len(y_score)}")
    if not set(np.unique(y_true)) <= {0, 1}:
        raise DataError("labels must be 0 (negative) or 1 (positive)")
    if len(np.unique(y_true)) < 2:
        raise SingleClassError(
            f"all {len(y_true)} labels are {int(y_true[0]) if len(y_true) else 'absent'}: "
            "ROC AUC, sensitivity and specificity need both benign and malignant cases"
        )
    if not np.all(np.isfinite(y_score)):
        raise DataError("scores contain NaN or infinity")
    return y_true, y_score


def is_positive(y_score: Any, threshold: float) -> Any:
    """The decision rule of every busdx model: positive where ``score >= threshold``.

    The one place of that rule: prediction, evaluation, cross-fitting and the accuracy logged
    during training all call it. ``y_score`` is a NumPy array, a torch tensor (the answer is
    then a tensor on the same device) or anything :func:`numpy.asarray` takes.
    """
    scores = y_score if hasattr(y_score, "shape") else np.asarray(y_score)
    return scores >= threshold


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """True/false positives and negatives for 0/1 labels and predictions."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    return {
        "tp": int(np.sum(y_true & y_pred)),
        "fp": int(np.sum(~y_true & y_pred)),
        "tn": int(np.sum(~y_true & ~y_pred)),
        "fn": int(np.sum(y_true & ~y_pred)),
    }


def roc_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and the thresholds (descending) that give them.

    The first point is (0, 0) at threshold +inf; tied scores form a single step.
    """
    y_true, y_score = _check(y_true, y_score)
    order = np.argsort(-y_score, kind="mergesort")
    scores, labels = y_score[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, ties counted as one half)."""
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return float(np.trapezoid(tpr, fpr))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum (scikit-learn's definition)."""
    y_true, y_score = _check(y_true, y_score)
    order = np.argsort(-y_score, kind="mergesort")
    scores, labels = y_score[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared difference between predicted probability and outcome (lower is better)."""
    y_true, y_prob = _check(y_true, y_prob)
    return float(np.mean((y_prob - y_true) ** 2))


def reliability_bins(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10
) -> list[dict[str, float]]:
    """Per equal-width probability bin: count, mean predicted probability, observed frequency."""
    y_true = np.asarray(y_true, dtype=float)
    y_prob = np.asarray(y_prob, dtype=float)
    index = np.minimum((y_prob * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        chosen = index == b
        if chosen.any():
            bins.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "count": int(chosen.sum()),
                    "mean_predicted": float(y_prob[chosen].mean()),
                    "observed": float(y_true[chosen].mean()),
                }
            )
    return bins


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """Count-weighted mean |observed frequency - mean predicted probability| over the bins."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["observed"] - b["mean_predicted"]) for b in bins) / total)


def sensitivity_lower_bound(detected: np.ndarray, positives: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower confidence bound of sensitivity ``detected / positives``.

    With ``confidence`` 0 it is the observed sensitivity itself.
    """
    detected = np.asarray(detected, dtype=float)
    if confidence == 0:
        return detected / positives
    from scipy.stats import beta  # imported here: scipy.stats takes 0.4 s to import

    bound = beta.ppf(1 - confidence, np.maximum(detected, 1e-12), positives - detected + 1)
    return np.where(detected > 0, bound, 0.0)


def threshold_for_sensitivity(
    y_true: np.ndarray, y_score: np.ndarray, target: float, *, confidence: float = 0.0
) -> float:
    """The highest threshold whose sensitivity (score >= threshold) reaches ``target``.

    With ``confidence`` > 0, the sensitivity's one-sided Clopper-Pearson lower bound at that
    confidence must reach ``target``, not just its point estimate: on ``n`` positives the
    threshold then keeps its promise with that probability for new cases drawn like these. When
    no threshold can show that (too few positives: even n of n detected leaves the bound below
    the target), the threshold detecting every positive is returned, the most that these cases
    can support.
    """
    y_true, y_score = _check(y_true, y_score)
    _, tpr, thresholds = roc_curve(y_true, y_score)
    positives = int(y_true.sum())
    reached = np.flatnonzero(
        sensitivity_lower_bound(tpr * positives, positives, confidence) >= target
    )
    if not len(reached):
        reached = np.flatnonzero(tpr >= 1.0)
    return float(thresholds[reached[0]])


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(y_true, y_score)
    j = tpr - fpr
    j[0] = -np.inf  # threshold +inf calls nothing positive
    return float(thresholds[int(np.argmax(j))])


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, sensitivity, specificity, PPV, NPV, F1 and the confusion matrix."""
    y_true, y_score = _check(y_true, y_score)
    counts = confusion_counts(y_true, is_positive(y_score, threshold))
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "n": len(y_true),
        "n_positive": int(y_true.sum()),
        "threshold": threshold,
        "accuracy": (tp + tn) / len(y_true),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "roc_auc": roc_auc(y_true, y_score),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "pr_auc": average_precision(y_true, y_score),
        "brier": brier_score(y_true, y_score),
        "ece": expected_calibration_error(y_true, y_score),
        "confusion": counts,
    }


SCORE_METRICS = ("roc_auc", "pr_auc", "brier", "ece")  # need no threshold
DECISION_METRICS = (
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "balanced_accuracy",
    "f1",
)
BOOTSTRAPPED = SCORE_METRICS + DECISION_METRICS


def _resamples(y_true: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded bootstrap case indices; a resample holding a single class is skipped."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        index = rng.integers(0, len(y_true), len(y_true))
        if y_true[index].min() != y_true[index].max():
            yield index


def bootstrap_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    threshold: float,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float | int]]:
    """Percentile bootstrap confidence intervals of :func:`binary_metrics`, per metric.

    Cases are resampled with replacement; a resample holding a single class is skipped and
    counted in ``n_skipped``. Each metric gets ``low`` and ``high``; a ratio that is undefined in
    some resamples (e.g. PPV with no positive calls) is taken over the others.
    """
    y_true, y_score = _check(y_true, y_score)
    values: dict[str, list[float]] = {name: [] for name in BOOTSTRAPPED}
    used = 0
    for index in _resamples(y_true, n_resamples, seed):
        used += 1
        resample = binary_metrics(y_true[index], y_score[index], threshold=threshold)
        for name in BOOTSTRAPPED:
            values[name].append(resample[name])
    alpha = (1 - level) / 2
    intervals: dict[str, dict[str, float | int]] = {}
    for name, samples in values.items():
        finite = np.array([v for v in samples if not math.isnan(v)])
        low, high = np.quantile(finite, [alpha, 1 - alpha]) if len(finite) else (math.nan,) * 2
        intervals[name] = {"low": float(low), "high": float(high)}
    intervals["_resamples"] = {"used": used, "skipped": n_resamples - used, "level": level}
    return intervals


def paired_bootstrap(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float] | None = None,
    *,
    metric_b: Callable[[np.ndarray, np.ndarray], float] | None = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Paired percentile bootstrap of ``metric(A) - metric_b(B)`` on the same cases.

    Both scores are resampled with the same case indices, so what the two share (the cases)
    cancels out of the difference. ``metric`` defaults to ROC AUC and ``metric_b`` to
    ``metric``; pass, for example, ``lambda y, s: binary_metrics(y, s, threshold=t)[
    "sensitivity"]`` for a decision metric (each arm may have its own threshold).
    Returns the observed difference, its CI, and a two-sided bootstrap p-value (twice the
    share of resampled differences on the other side of zero).
    """
    metric = metric or roc_auc
    metric_b = metric_b or metric
    y_true, score_a = _check(y_true, score_a)
    score_b = np.asarray(score_b, dtype=float)
    if score_b.shape != score_a.shape:
        raise DataError(f"paired scores differ in length: {len(score_a)} vs {len(score_b)}")
    deltas = []
    for index in _resamples(y_true, n_resamples, seed):
        deltas.append(
            metric(y_true[index], score_a[index]) - metric_b(y_true[index], score_b[index])
        )
    deltas_array = np.array(deltas)
    alpha = (1 - level) / 2
    low, high = np.quantile(deltas_array, [alpha, 1 - alpha])
    a, b = metric(y_true, score_a), metric_b(y_true, score_b)
    tail = min(np.mean(deltas_array <= 0), np.mean(deltas_array >= 0))
    return {
        "a": float(a),
        "b": float(b),
        "delta": float(a - b),
        "low": float(low),
        "high": float(high),
        "p_value": float(min(1.0, 2 * tail)),
        "n": len(y_true),
        "resamples": len(deltas),
        "level": level,
    }


def roc_band(
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    grid_points: int = 101,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise bootstrap band of the ROC curve: (fpr grid, tpr low, tpr high)."""
    y_true, y_score = _check(y_true, y_score)
    grid = np.linspace(0, 1, grid_points)
    curves = []
    for index in _resamples(y_true, n_resamples, seed):
        fpr, tpr, _ = roc_curve(y_true[index], y_score[index])
        curves.append(np.interp(grid, fpr, tpr))
    alpha = (1 - level) / 2
    low, high = np.quantile(np.array(curves), [alpha, 1 - alpha], axis=0)
    return grid, low, high
