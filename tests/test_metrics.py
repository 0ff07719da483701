import re

import numpy as np
import pytest
from sklearn import metrics as skm

from busdx.errors import DataError, SingleClassError
from busdx.stats.metrics import (
    binary_metrics,
    bootstrap_ci,
    expected_calibration_error,
    paired_bootstrap,
    reliability_bins,
    roc_auc,
    roc_band,
    roc_curve,
    sensitivity_lower_bound,
    threshold_for_sensitivity,
    youden_threshold,
)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, 200), 0, 1), 2)  # with ties
    m = binary_metrics(y, score, threshold=0.5)
    pred = (score >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    fpr, tpr, _ = roc_curve(y, score)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], threshold=0.5)
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (0.5, 0.5, 0.5, 0.5)


def test_undefined_ratio_is_nan_not_zero():
    m = binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)  # no positive calls
    assert np.isnan(m["ppv"]) and m["sensitivity"] == 0.0


def test_single_class_is_an_error_not_nan():
    with pytest.raises(SingleClassError, match="both benign and malignant"):
        binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])


@pytest.mark.parametrize("seed", range(3))
def test_pr_auc_and_brier_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    y[:2] = [0, 1]
    p = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.2, 150), 0, 1), 2)
    m = binary_metrics(y, p)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))


def test_ece_of_a_calibrated_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)  # outcomes drawn at the stated probability
    assert expected_calibration_error(y, p) < 0.02
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    assert expected_calibration_error(y, overconfident) > 0.2


def test_bootstrap_interval_covers_the_truth_at_about_its_level():
    """Over 60 simulated studies of n=120, the 90% CI of sensitivity covers the true 0.8."""
    covered, widths = 0, []
    for study in range(60):
        rng = np.random.default_rng(100 + study)
        y = np.r_[np.ones(60, int), np.zeros(60, int)]
        hit = rng.uniform(size=60) < 0.8  # true sensitivity 0.8
        score = np.r_[np.where(hit, 0.9, 0.1), rng.uniform(0, 0.4, 60)]
        ci = bootstrap_ci(y, score, threshold=0.5, n_resamples=300, level=0.9, seed=study)
        covered += ci["sensitivity"]["low"] <= 0.8 <= ci["sensitivity"]["high"]
        widths.append(ci["sensitivity"]["high"] - ci["sensitivity"]["low"])
    assert 0.75 <= covered / 60 < 1.0
    # binomial sd at n=60, p=0.8 is 0.052, so a 90% interval is about 0.17 wide
    assert 0.12 <= np.mean(widths) <= 0.22


def test_bootstrap_is_seeded_and_counts_skipped_resamples():
    y, p = np.array([0, 1, 0, 0]), np.array([0.2, 0.8, 0.4, 0.1])
    first = bootstrap_ci(y, p, threshold=0.5, n_resamples=200, seed=1)
    assert first == bootstrap_ci(y, p, threshold=0.5, n_resamples=200, seed=1)
    assert first["_resamples"]["skipped"] > 0  # many resamples miss the single positive
    assert first["_resamples"]["used"] + first["_resamples"]["skipped"] == 200


def test_operating_point_thresholds():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert threshold_for_sensitivity(y, p, 1.0) == 0.4
    assert threshold_for_sensitivity(y, p, 0.75) == 0.7
    assert youden_threshold(y, p) == 0.7  # sens 0.75 + spec 1.0


def test_paired_bootstrap_of_identical_and_of_better_scores():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 80)
    weak = rng.random(160) + 0.2 * y
    strong = rng.random(160) + 1.5 * y
    same = paired_bootstrap(y, weak, weak, n_resamples=300)
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0
    better = paired_bootstrap(y, strong, weak, n_resamples=300)
    assert better["delta"] == pytest.approx(roc_auc(y, strong) - roc_auc(y, weak))
    assert 0 < better["low"] < better["delta"] < better["high"] and better["p_value"] < 0.01


def test_clopper_pearson_bound_and_conservative_threshold():
    # all 10 of 10 detected: the one-sided 95% lower bound is 0.05 ** (1 / 10)
    assert sensitivity_lower_bound(10, 10, 0.95) == pytest.approx(0.05**0.1)
    assert sensitivity_lower_bound(7, 10, 0.0) == pytest.approx(0.7)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    scores = rng.random(400) + 0.8 * y
    plain = threshold_for_sensitivity(y, scores, 0.9)
    careful = threshold_for_sensitivity(y, scores, 0.9, confidence=0.95)
    assert careful < plain
    detected = int((scores[y == 1] >= careful).sum())
    assert sensitivity_lower_bound(detected, 200, 0.95) >= 0.9
    # too few positives to show 0.99 at 95% confidence: the threshold detecting all of them
    few_y, few_scores = y[190:210], scores[190:210]
    assert threshold_for_sensitivity(few_y, few_scores, 0.99, confidence=0.95) == (
        few_scores[few_y == 1].min()
    )


@pytest.mark.parametrize(
    ("y_true", "y_score", "error", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], DataError, "labels and scores differ in length: 3 vs 2"),
        ([0, 2], [0.1, 0.2], DataError, "labels must be 0 (negative) or 1 (positive)"),
        ([1, 1, 1], [0.1, 0.2, 0.3], SingleClassError, "all 3 labels are 1: ROC AUC"),
        ([], [], SingleClassError, "all 0 labels are absent: ROC AUC"),
        ([0, 1], [0.1, np.nan], DataError, "scores contain NaN or infinity"),
        ([0, 1], [0.1, np.inf], DataError, "scores contain NaN or infinity"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(y_true, y_score, error, message):
    with pytest.raises(error, match=re.escape(message)):
        roc_auc(np.array(y_true), np.array(y_score))


def test_labels_and_scores_of_any_numeric_type_are_read_alike():
    """Float labels, integer scores and column vectors give the same metrics as ints/floats."""
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([1, 3, 2, 4, 5])
    assert roc_auc(y.astype(float).reshape(-1, 1), s.reshape(-1, 1)) == roc_auc(y, s / 1.0)
    assert roc_auc(y, s) == pytest.approx(5 / 6)


def test_reliability_bins_on_a_worked_example():
    y = np.array([0, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.55, 0.95, 1.0])  # 1.0 falls in the last bin, not an 11th
    bins = reliability_bins(y, p, n_bins=10)
    assert [(b["low"], b["high"], b["count"]) for b in bins] == [
        (0.0, 0.1, 1), (0.1, 0.2, 1), (0.5, 0.6, 1), (0.9, 1.0, 2),
    ]  # fmt: skip
    assert bins[3]["mean_predicted"] == pytest.approx(0.975) and bins[3]["observed"] == 1.0
    assert bins[2]["observed"] == 0.0 and bins[1]["mean_predicted"] == pytest.approx(0.15)
    ece = expected_calibration_error(y, p, n_bins=10)
    assert ece == pytest.approx((0.05 + 0.85 + 0.55 + 2 * 0.025) / 5)
    assert len(reliability_bins(y, p, n_bins=2)) == 2


def test_paired_bootstrap_reports_both_arms_and_a_shift_the_resamples_confirm():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 100)
    better = y + rng.normal(0, 0.6, 200)
    worse = y + rng.normal(0, 1.5, 200)
    result = paired_bootstrap(y, better, worse, n_resamples=300, level=0.9, seed=1)
    assert result["a"] == pytest.approx(roc_auc(y, better))
    assert result["b"] == pytest.approx(roc_auc(y, worse))
    assert result["delta"] == pytest.approx(result["a"] - result["b"])
    assert 0 < result["low"] < result["delta"] < result["high"] < 0.5
    assert result["p_value"] < 0.01 and result["level"] == 0.9
    assert (result["n"], result["resamples"]) == (200, 300)
    swapped = paired_bootstrap(y, worse, better, n_resamples=300, level=0.9, seed=1)
    assert swapped["delta"] == pytest.approx(-result["delta"])
    assert swapped["high"] == pytest.approx(-result["low"], abs=1e-12)
    with pytest.raises(DataError, match="paired scores differ in length: 200 vs 3"):
        paired_bootstrap(y, better, worse[:3])


def test_roc_band_brackets_the_curve_and_narrows_with_more_cases():
    rng = np.random.default_rng(4)

    def band(n):
        y = np.repeat([0, 1], n)
        return band_of(y, y + rng.normal(0, 1.0, 2 * n))

    def band_of(y, s):
        return roc_band(y, s, n_resamples=200, level=0.9, seed=0, grid_points=51)

    grid, low, high = band(40)
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == len(low) == len(high) == 51
    assert np.all(low <= high) and np.all((low >= 0) & (high <= 1))
    assert high[-1] == low[-1] == 1.0  # every resampled curve ends at (1, 1)
    y = np.repeat([0, 1], 40)
    scores = y + rng.normal(0, 1.0, 80)
    fpr, tpr, _ = roc_curve(y, scores)
    _, low, high = band_of(y, scores)
    inside = (np.interp(grid, fpr, tpr) >= low - 1e-9) & (np.interp(grid, fpr, tpr) <= high + 1e-9)
    assert inside.mean() > 0.9  # the observed curve lies inside its own band
    _, wide_low, wide_high = band(20)
    _, tight_low, tight_high = band(400)
    assert (tight_high - tight_low).mean() < (wide_high - wide_low).mean() / 2
