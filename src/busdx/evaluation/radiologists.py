"""The model against the radiologists: reader scores (BI-RADS) on the same images.

Where a site's labels file records each case's BI-RADS category (the readers' own ranking of
suspicion: 2 < 3 < 4a < 4b < 4c < 5), the model is compared with the readers on the same
images, as a clinician would ask:

* the readers' ROC curve and AUC, with the model's, and a paired bootstrap of ΔAUC
  (model - readers): the same resampled cases for both, so the difference's CI is honest;
* the readers' operating points (BI-RADS ≥ 4a and ≥ 4b called positive: the biopsy
  recommendations; ≥ 4 and ≥ 5 where the readers did not subdivide category 4, as in BUS-BRA)
  with sensitivity and specificity;
* at each of those, the model's specificity at the readers' sensitivity (the model's highest
  threshold that detects at least as many cancers), with a paired bootstrap of Δspecificity.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from busdx.errors import DataError
from busdx.layout import LABELS_TABLE
from busdx.results import ReaderComparison
from busdx.stats.metrics import binary_metrics, bootstrap_ci, paired_bootstrap, roc_auc

__all__ = [
    "BIRADS_ORDER",
    "READER_POINTS",
    "birads_rank",
    "compare_with_readers",
    "match_reader_scores",
    "rank_categories",
    "read_reader_scores",
    "reader_points",
    "reader_ranks",
]

logger = logging.getLogger(__name__)

BIRADS_ORDER = ("1", "2", "3", "4a", "4b", "4c", "5", "6")
READER_POINTS = ("4a", "4b")  # BI-RADS >= 4a: biopsy recommended; >= 4b: moderate suspicion
UNSPLIT_POINTS = ("4", "5")  # where category 4 is not subdivided: >= 4 (biopsy), >= 5


def birads_rank(category: str) -> int:
    """Ordinal rank of a BI-RADS category (``"4A"``, ``"4a"`` and ``" 4a "`` are the same)."""
    key = str(category).strip().lower()
    if key == "4":  # an unsplit category 4 ranks with 4a, the lowest suspicion in it
        key = "4a"
    if key not in BIRADS_ORDER:
        raise DataError(
            f"unknown BI-RADS category {category!r}; expected one of {', '.join(BIRADS_ORDER)}"
        )
    return BIRADS_ORDER.index(key)


def read_reader_scores(path: str | Path, column: str = "birads") -> dict[str, int]:
    """Reader ranks by image from a labels CSV: ``{relative path or file name: rank}``.

    The file needs the ``column`` (BI-RADS) and a ``relative_path``, ``path`` or ``image``
    column naming the image; rows with an empty category are left out.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        key = next((name for name in ("relative_path", "path", "image") if name in fields), None)
        if column not in fields or key is None:
            raise DataError(
                f"{path} needs a {column!r} column and a relative_path, path or image column"
            )
        return {
            row[key].strip(): birads_rank(row[column])
            for row in reader
            if row[column] and row[column].strip()
        }


def rank_categories(categories: Sequence[str | None]) -> np.ndarray | None:
    """Ranks of BI-RADS categories (e.g. the ``birads`` of table samples); None if any is
    missing."""
    if not categories or any(c is None or not str(c).strip() for c in categories):
        return None
    return np.array([birads_rank(c) for c in categories], dtype=float)


def reader_points(ranks: np.ndarray) -> tuple[str, ...]:
    """The readers' operating points to report: ≥ 4a and ≥ 4b, or ≥ 4 and ≥ 5 when no case
    was put in 4b or 4c (category 4 not subdivided, read as 4a)."""
    split = {birads_rank("4b"), birads_rank("4c")} & set(np.asarray(ranks).tolist())
    return READER_POINTS if split else UNSPLIT_POINTS


def match_reader_scores(relpaths: Sequence[str], scores: dict[str, int]) -> np.ndarray | None:
    """Reader rank of each image (by relative path, else file name); None if any is missing."""
    names = {Path(key).name: value for key, value in scores.items()}
    ranks = [scores.get(p, names.get(Path(p).name)) for p in relpaths]
    if any(rank is None for rank in ranks):
        return None
    return np.array(ranks, dtype=float)


def reader_ranks(
    samples: Sequence[Any],
    data_root: Path,
    readers_file: str | Path | None = None,
    column: str = "birads",
) -> np.ndarray | None:
    """The readers' BI-RADS rank of each sample, or None when they are not known.

    From ``readers_file`` when given (an error if it is missing or lacks the column), else
    from the labels table the samples came from (their ``birads``), else from
    ``data_root/labels.csv`` if it has the column.
    """
    from_table = rank_categories([s.birads for s in samples])
    if from_table is not None and not readers_file:
        return from_table
    path = Path(readers_file) if readers_file else data_root / LABELS_TABLE
    if not path.is_file():
        if readers_file:
            raise DataError(f"reader scores file {path} does not exist")
        return None
    try:
        scores = read_reader_scores(path, column=column)
    except DataError:
        if readers_file:
            raise
        return None  # a labels.csv without reader scores
    ranks = match_reader_scores([s.relpath for s in samples], scores)
    if ranks is None:
        logger.warning("%s lacks reader scores for some images: no reader comparison", path)
    return ranks


def _specificity_at_sensitivity(y_true: np.ndarray, y_score: np.ndarray, sensitivity: float):
    """The model's highest threshold reaching ``sensitivity``, and its specificity there."""
    positives = np.sort(y_score[y_true == 1])[::-1]
    needed = int(np.ceil(sensitivity * len(positives) - 1e-9))
    threshold = positives[max(needed, 1) - 1]
    return float(threshold), binary_metrics(y_true, y_score, threshold=threshold)["specificity"]


def compare_with_readers(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    reader_ranks: np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ReaderComparison:
    """Readers' AUC and operating points beside the model's, with paired bootstrap CIs."""
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    ranks = np.asarray(reader_ranks, dtype=float)
    ci = dict(n_resamples=n_resamples, level=level, seed=seed)
    readers_auc_ci = bootstrap_ci(y_true, ranks, threshold=0, **ci)["roc_auc"]
    result: dict[str, Any] = {
        "n": len(y_true),
        "readers_roc_auc": roc_auc(y_true, ranks),
        "readers_roc_auc_ci": readers_auc_ci,
        "delta_roc_auc": paired_bootstrap(y_true, y_prob, ranks, **ci),
        "operating_points": {},
    }
    for category in reader_points(ranks):
        cut = birads_rank(category)
        readers = binary_metrics(y_true, ranks, threshold=cut)
        threshold, specificity = _specificity_at_sensitivity(y_true, y_prob, readers["sensitivity"])
        decided = (ranks >= cut).astype(float)
        delta = paired_bootstrap(
            y_true,
            y_prob,
            ranks,
            lambda y, s, t=threshold: binary_metrics(y, s, threshold=t)["specificity"],
            metric_b=lambda y, s, c=cut: binary_metrics(y, s, threshold=c)["specificity"],
            **ci,
        )
        readers_ci = bootstrap_ci(y_true, decided, threshold=0.5, **ci)
        result["operating_points"][f"birads>={category}"] = {
            "readers": {key: readers[key] for key in ("sensitivity", "specificity", "ppv", "npv")},
            "readers_ci": {key: readers_ci[key] for key in ("sensitivity", "specificity")},
            "model_threshold": threshold,
            "model_specificity_at_readers_sensitivity": specificity,
            "delta_specificity": delta,
        }
    return ReaderComparison.model_validate(result)
