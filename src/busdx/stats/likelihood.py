"""Likelihood categories aligned with the BI-RADS ranges of malignancy.

The ACR BI-RADS Atlas (5th edition) gives each assessment category a range of likelihood of
malignancy: 3, at most 2%; 4a, above 2% to 10%; 4b, above 10% to 50%; 4c, above 50% to below
95%; 5, 95% or more. busdx maps a model's *calibrated* probability into the same ranges, so a
reader sees its answer on a familiar scale. It is a likelihood category computed by the model,
never a BI-RADS assessment: an assessment is a radiologist's, made from the whole examination.
:func:`category_table` checks the mapping where it matters: at a held-out site, the observed
rate of malignancy in each category, with its exact interval, against the category's range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from busdx.stats.agreement import binomial_interval

__all__ = [
    "CATEGORY_LABEL",
    "LIKELIHOOD_RANGES",
    "CategoryRow",
    "category_table",
    "likelihood_category",
]

CATEGORY_LABEL = "model likelihood category (BI-RADS ranges; not a BI-RADS assessment)"
LIKELIHOOD_RANGES = {  # category: (low, high) of the probability of malignancy
    "3": (0.0, 0.02),
    "4a": (0.02, 0.10),
    "4b": (0.10, 0.50),
    "4c": (0.50, 0.95),
    "5": (0.95, 1.0),
}


def likelihood_category(probability: float) -> str:
    """The BI-RADS range a calibrated probability falls in: 3 (<= 2%), 4a (> 2-10%), 4b
    (> 10-50%), 4c (> 50% to < 95%), 5 (>= 95%)."""
    if probability >= 0.95:
        return "5"
    if probability > 0.50:
        return "4c"
    if probability > 0.10:
        return "4b"
    return "4a" if probability > 0.02 else "3"


@dataclass(frozen=True)
class CategoryRow:
    """One category at one site: how many cases, how many malignant, and whether the
    observed rate sits in the category's range (else how far outside it)."""

    category: str
    low: float  # the range's ends (for the readers' categories: the BI-RADS ones too)
    high: float
    n: int
    malignant: int
    rate: float | None
    rate_low: float
    rate_high: float
    distance: float | None  # 0 inside the range; else how far the observed rate lies outside


def _row(category: str, bounds: tuple[float, float], malignant: int, n: int, level: float):
    rate = malignant / n if n else None
    low, high = binomial_interval(malignant, n, level)
    distance = None if rate is None else max(bounds[0] - rate, rate - bounds[1], 0.0)
    return CategoryRow(category, *bounds, n, malignant, rate, low, high, distance)


def category_table(
    categories: Sequence[str], y_true: Sequence[int], *, level: float = 0.95
) -> list[CategoryRow]:
    """Observed malignancy per category (model likelihood categories, or the readers' BI-RADS
    3-5), in the order of :data:`LIKELIHOOD_RANGES`; categories outside it (BI-RADS 1-2) come
    first, with the range of category 3."""
    names, truth = np.asarray(categories), np.asarray(y_true, dtype=int)
    extra = sorted(set(names) - set(LIKELIHOOD_RANGES))
    rows = []
    for name in [*extra, *LIKELIHOOD_RANGES]:
        chosen = names == name
        bounds = LIKELIHOOD_RANGES.get(name, LIKELIHOOD_RANGES["3"])
        rows.append(_row(name, bounds, int(truth[chosen].sum()), int(chosen.sum()), level))
    return rows
