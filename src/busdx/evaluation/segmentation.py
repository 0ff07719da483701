"""How well a mask-head model outlines lesions, on images whose readers drew them.

:func:`score_lesions` runs the model on each image with a lesion mask and compares its outline
with the reader's: Dice and IoU on the whole image, and the lesion each mask describes
(:func:`busdx.lesion.descriptors.describe_lesion`: size, shape, orientation, margin, posterior
features).
:func:`summarise_lesions` gives the mean Dice and IoU with bootstrap CIs and how far the
model's longest diameter is from the reader's; ``busdx evaluate`` reports both for a model with
a mask head (``metrics.json``: ``segmentation``; ``lesions.csv``: each image).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from busdx.data.boxes import read_mask
from busdx.data.datasets import Sample
from busdx.data.imaging import load_image
from busdx.data.preprocess import region_of
from busdx.fileio import atomic_write_text
from busdx.inference.predictor import Predictor
from busdx.lesion.descriptors import LESION_FIELDS, Lesion, describe_lesion, lesion_fields
from busdx.lesion.outline import image_mask, lesion_from_mask, region_view
from busdx.results import Segmentation
from busdx.stats.agreement import dice, iou

__all__ = ["LesionScore", "score_lesions", "summarise_lesions", "write_lesions"]

Spacing = Callable[[Sample], tuple[float, float] | None]


@dataclass(frozen=True)
class LesionScore:
    """One image: the overlap of the model's outline with the reader's, and both lesions."""

    relpath: str
    dice: float
    iou: float
    predicted: Lesion | None  # None: the model outlined nothing
    truth: Lesion | None


def score_lesions(
    loaded: Predictor, samples: Sequence[Sample], *, spacing: Spacing | None = None,
    batch_size: int = 16, progress: bool = True,
) -> list[LesionScore]:  # fmt: skip
    """Score the outline of every sample that has a mask (``spacing``: a sample's pixel size
    in mm, when known, to measure in mm)."""
    prep, scores = loaded.preprocessing, []
    chosen = [s for s in samples if s.masks]
    bar = tqdm(total=len(chosen), desc="outline", unit="img", disable=not progress, leave=False)
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        images = [load_image(s.path) for s in batch]
        regions = [
            region_of(image, s.box, prep, name=str(s.path))
            for s, image in zip(batch, images, strict=True)
        ]
        decisions = loaded.decide_images(images, regions=regions, label_out_of_scope=True)
        for sample, image, decision in zip(batch, images, decisions, strict=True):
            known = spacing(sample) if spacing else None
            view = region_view(image, sample.box, prep, known)
            predicted = image_mask(decision.mask, view, prep, image.size)
            truth = np.asarray(read_mask(sample.masks, image.size)) > 0
            grey = np.asarray(image.convert("L"))
            scores.append(LesionScore(
                sample.relpath, dice(predicted, truth), iou(predicted, truth),
                lesion_from_mask(decision.mask, view, prep), describe_lesion(truth, grey, known),
            ))  # fmt: skip
        bar.update(len(batch))
    bar.close()
    return scores


def _mean_ci(values: np.ndarray, n_resamples: int, level: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def summarise_lesions(
    scores: Sequence[LesionScore], *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> Segmentation:
    """Mean Dice and IoU with percentile-bootstrap CIs, median Dice, and the model's longest
    diameter against the reader's (mean absolute difference, on images where both exist)."""
    dices = np.array([s.dice for s in scores])
    ious = np.array([s.iou for s in scores])
    both = [s for s in scores if s.predicted is not None and s.truth is not None]
    errors = np.array([abs(s.predicted.long_axis - s.truth.long_axis) for s in both])
    return Segmentation(
        n=len(scores), dice=float(dices.mean()), dice_ci=_mean_ci(dices, n_resamples, level, seed),
        dice_median=float(np.median(dices)), iou=float(ious.mean()),
        iou_ci=_mean_ci(ious, n_resamples, level, seed),
        outlined=sum(s.predicted is not None for s in scores),
        long_axis_error=float(errors.mean()) if len(errors) else None,
        unit=both[0].truth.unit if both else None,
    )  # fmt: skip


def write_lesions(path: Path, scores: Sequence[LesionScore]) -> None:
    """``lesions.csv``: each image's Dice and IoU, the model's lesion and the reader's."""
    buffer = io.StringIO()
    truth_fields = [f"reader_{name}" for name in LESION_FIELDS]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "dice", "iou", *LESION_FIELDS, *truth_fields])
    for s in scores:
        lesions = [*lesion_fields(s.predicted).values(), *lesion_fields(s.truth).values()]
        writer.writerow([s.relpath, f"{s.dice:.4f}", f"{s.iou:.4f}", *lesions])
    atomic_write_text(path, buffer.getvalue())
