"""The reader (BI-RADS) comparison on fixtures whose answers are known by hand."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from busdx.errors import DataError
from busdx.evaluation.radiologists import (
    birads_rank,
    compare_with_readers,
    match_reader_scores,
    read_reader_scores,
)


def test_birads_order_and_spelling():
    ranks = [birads_rank(c) for c in ["2", "3", "4a", "4B", " 4c ", "5"]]
    assert ranks == sorted(ranks) and len(set(ranks)) == 6
    assert birads_rank("4") == birads_rank("4a")
    with pytest.raises(DataError, match="BI-RADS"):
        birads_rank("7x")


# 4 benign, 4 malignant. Readers: benign 2, 3, 4a, 4b; malignant 4a, 4b, 4c, 5.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
READERS = np.array([birads_rank(c) for c in ["2", "3", "4a", "4b", "4a", "4b", "4c", "5"]])


def test_reader_auc_and_operating_points_match_hand_counts():
    model = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])  # separates the classes
    result = compare_with_readers(LABELS, model, READERS, n_resamples=300)
    # pairs (malignant, benign): 16; readers win 13, tie 2 (4a-4a, 4b-4b), lose 1 -> 14/16
    assert result.readers_roc_auc == pytest.approx(14 / 16)
    assert result.delta_roc_auc.delta == pytest.approx(1 - 14 / 16)
    at_4a = result.operating_points["birads>=4a"]
    assert at_4a.readers["sensitivity"] == 1.0 and at_4a.readers["specificity"] == 0.5
    assert at_4a.model_specificity_at_readers_sensitivity == 1.0
    assert at_4a.delta_specificity.delta == pytest.approx(0.5)
    at_4b = result.operating_points["birads>=4b"]
    assert at_4b.readers["sensitivity"] == 0.75 and at_4b.readers["specificity"] == 0.75


def test_model_worse_than_readers_has_a_negative_difference():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    readers = np.where(labels == 1, rng.integers(4, 7, 120), rng.integers(1, 4, 120))
    model = rng.random(120)  # chance
    result = compare_with_readers(labels, model, readers, n_resamples=300)
    assert result.readers_roc_auc == pytest.approx(roc_auc_score(labels, readers))  # sklearn
    assert result.delta_roc_auc.high < 0


def test_reader_scores_from_csv_match_by_path_or_name(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text(
        "image,class,birads,relative_path\n"
        "case1.png,benign,3,benign/case1.png\n"
        "case2.png,malignant,4C,malignant/case2.png\n"
    )
    scores = read_reader_scores(table)
    assert scores == {"benign/case1.png": birads_rank("3"), "malignant/case2.png": 5}
    ranks = match_reader_scores(["malignant/case2.png", "benign/case1.png"], scores)
    assert ranks.tolist() == [5, 2]
    assert match_reader_scores(["other/case3.png"], scores) is None
    (tmp_path / "bad.csv").write_text("image,class\ncase1.png,benign\n")
    with pytest.raises(DataError, match="birads"):
        read_reader_scores(tmp_path / "bad.csv")
