"""Agreement: of a predicted lesion mask with a reader's (Dice, IoU), of a categorical
descriptor with the readers' (Cohen's kappa with a bootstrap CI and the confusion table), and
of an observed rate with its exact binomial interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["binomial_interval", "cohen_kappa", "confusion_table", "dice", "iou", "kappa_with_ci"]


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two binary masks (1.0 when both are
    empty)."""
    a, b = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(predicted, bool), np.asarray(truth, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def confusion_table(
    rated: Sequence[str], reference: Sequence[str], categories: Sequence[str]
) -> list[list[int]]:
    """Counts: row = the reference's category (the readers'), column = the rated one."""
    index = {name: i for i, name in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)), dtype=int)
    for a, b in zip(rated, reference, strict=True):
        table[index[b], index[a]] += 1
    return table.tolist()


def cohen_kappa(rated: Sequence[str], reference: Sequence[str]) -> float:
    """Cohen's kappa: agreement beyond chance, ``(p_o - p_e) / (1 - p_e)``; NaN when chance
    agreement is already perfect (one category only)."""
    a, b = np.asarray(rated), np.asarray(reference)
    categories = sorted(set(a) | set(b))
    observed = float(np.mean(a == b))
    expected = sum(float(np.mean(a == c) * np.mean(b == c)) for c in categories)
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)


def kappa_with_ci(
    rated: Sequence[str], reference: Sequence[str], *, n_resamples: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """Cohen's kappa and its percentile bootstrap interval (cases resampled with
    replacement)."""
    a, b = np.asarray(rated), np.asarray(reference)
    rng = np.random.default_rng(seed)
    draws = [cohen_kappa(a[i], b[i]) for i in rng.integers(0, len(a), (n_resamples, len(a)))]
    finite = np.array([k for k in draws if not np.isnan(k)])
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha]) if len(finite) else (np.nan, np.nan)
    return cohen_kappa(a, b), float(low), float(high)


def binomial_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion; (0, 1) for no trials."""
    from scipy.stats import beta  # imported here: scipy.stats takes 0.4 s to import

    if trials == 0:
        return 0.0, 1.0
    alpha = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    )
    return low, high
