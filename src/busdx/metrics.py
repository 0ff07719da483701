"""Binary classification metrics with their clinical definitions (numpy only).

The positive class (label 1) is malignant. A prediction is positive when its probability is at
or above the threshold. Ratios whose denominator is zero (e.g. PPV with no positive calls) are
NaN, reported as ``null`` in JSON; a label set with a single class raises
:class:`SingleClassError` because ROC AUC, sensitivity or specificity would be undefined.
"""

from __future__ import annotations

import math

import numpy as np

from busdx.errors import DataError, SingleClassError

__all__ = ["binary_metrics", "confusion_counts", "roc_auc", "roc_curve"]


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


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, sensitivity, specificity, PPV, NPV, F1 and the confusion matrix."""
    y_true, y_score = _check(y_true, y_score)
    counts = confusion_counts(y_true, y_score >= threshold)
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
        "confusion": counts,
    }
