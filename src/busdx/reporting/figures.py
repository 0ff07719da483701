"""Figures a person would rather look at than read: curves, ROC, confusion matrix, samples.

Every figure is written atomically as PNG with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from busdx.fileio import atomic_path
from busdx.results import Confusion, Metrics, ReaderComparison, ReliabilityBin
from busdx.stats.metrics import is_positive, roc_auc, roc_curve

__all__ = [
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "plot_roc_curve",
    "plot_sample_predictions",
    "plot_training_curves",
]


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_training_curves(history: Sequence[dict], path: Path) -> None:
    """Accuracy and loss per epoch, train vs validation (the recipe's Training.png)."""
    epochs = [row["epoch"] for row in history]
    figure, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in ((acc_ax, "accuracy", "Accuracy"), (loss_ax, "loss", "Loss")):
        axis.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "s-", label="validation")
        axis.set(title=f"{title} per epoch", xlabel="epoch", ylabel=metric)
        axis.grid(alpha=0.3)
        axis.legend()
    _save(figure, path)


def plot_roc_curve(
    y_true: np.ndarray,
    y_score: np.ndarray,
    points: Mapping[str, Metrics],
    path: Path,
    *,
    title: str = "ROC curve",
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    readers: tuple[np.ndarray, ReaderComparison] | None = None,
    ci_level: float = 0.95,
) -> None:
    """ROC curve, its ``ci_level`` bootstrap band, and the operating point of each candidate
    threshold (``points``, by name; a point without a threshold was decided elsewhere).

    ``readers`` (reader ranks, :func:`busdx.evaluation.radiologists.compare_with_readers` result)
    adds the readers' ROC curve and their BI-RADS operating points.
    """
    fpr, tpr, _ = roc_curve(y_true, y_score)
    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    if band is not None:
        grid, low, high = band
        axis.fill_between(grid, low, high, alpha=0.2, label=f"{ci_level:.0%} bootstrap band")
    auc = roc_auc(y_true, y_score)
    axis.plot(fpr, tpr, lw=2, label=f"ROC (AUC {auc:.3f}, n={len(y_true)})")
    axis.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    for (name, point), marker in zip(points.items(), "osD^", strict=False):
        label = name if point.threshold is None else f"{name} (t={point.threshold:.2f})"
        axis.plot(1 - point.specificity, point.sensitivity, marker, ms=8, label=label)
    if readers is not None:
        ranks, comparison = readers
        reader_fpr, reader_tpr, _ = roc_curve(y_true, ranks)
        axis.plot(reader_fpr, reader_tpr, "-", color="black", lw=1.5,
                  label=f"readers' BI-RADS (AUC {comparison.readers_roc_auc:.3f})")  # fmt: skip
        for (name, reader_point), marker in zip(
            comparison.operating_points.items(), "PX", strict=False
        ):
            reader = reader_point.readers
            axis.plot(1 - reader["specificity"], reader["sensitivity"], marker, color="black",
                      ms=9, label=f"readers {name.replace('birads', 'BI-RADS ')}")  # fmt: skip
    axis.set(
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def plot_reliability_diagram(bins: Sequence[ReliabilityBin], ece: float, path: Path) -> None:
    """Observed frequency of malignancy against mean predicted probability, per bin."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    centers = [b.mean_predicted for b in bins]
    observed = [b.observed for b in bins]
    sizes = [20 + 200 * b.count / max(c.count for c in bins) for b in bins]
    axis.plot(centers, observed, "-", color="tab:blue", lw=1)
    axis.scatter(centers, observed, s=sizes, color="tab:blue", label="bins (area = count)")
    axis.set(
        xlabel="mean predicted probability",
        ylabel="observed fraction malignant",
        title=f"Reliability (ECE {ece:.3f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    _save(figure, path)


def plot_confusion_matrix(counts: Confusion, class_names: Sequence[str], path: Path) -> None:
    """2x2 confusion matrix, rows = true class, columns = predicted class."""
    matrix = np.array([[counts.tn, counts.fp], [counts.fn, counts.tp]])
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        axis.text(col, row, str(value), ha="center", va="center", fontsize=14, color=color)
    axis.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix",
    )
    _save(figure, path)


def plot_sample_predictions(
    images: Sequence[Image.Image],
    true_labels: Sequence[str],
    probabilities: Sequence[float],
    *,
    threshold: float,
    class_names: Sequence[str],
    path: Path,
    columns: int = 4,
    title: str = "Sample predictions",
) -> None:
    """Grid of images titled with true label, predicted label and probability; errors in red."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, truth, prob in zip(
        axes.flat, images, true_labels, probabilities, strict=False
    ):
        predicted = class_names[int(is_positive(prob, threshold))]
        wrong = predicted != truth
        axis.imshow(image)
        axis.set_title(
            f"true {truth}\npred {predicted} (p={prob:.2f})",
            color="crimson" if wrong else "black",
            fontsize=9,
        )
        if wrong:
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set(color="crimson", linewidth=3)
    figure.suptitle(f"{title} (p = probability of {class_names[1]}; errors in red)")
    _save(figure, path)
