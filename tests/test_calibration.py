import numpy as np
import pytest

from busdx.config import EvaluateConfig
from busdx.stats.calibration import apply_temperature, fit_operating_points, fit_temperature
from busdx.stats.metrics import expected_calibration_error


def _overconfident(n=4000, true_t=2.5, seed=0):
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0, 2, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    return true_logit * true_t, y  # a model whose logits are 2.5x too large


def test_temperature_recovers_known_overconfidence():
    logits, y = _overconfident()
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)


def test_calibrated_probabilities_come_close_to_the_true_ones():
    """The data are drawn from known probabilities (sigmoid of the true logit): after
    temperature scaling the model's probabilities match them closely, before they do not."""
    logits, y = _overconfident()
    truth = 1 / (1 + np.exp(-logits / 2.5))
    fitted = fit_operating_points(logits, y, EvaluateConfig())
    assert fitted.validation_ece["calibrated"] < fitted.validation_ece["uncalibrated"] / 2
    error_after = np.abs(apply_temperature(logits, fitted.temperature) - truth).mean()
    error_before = np.abs(apply_temperature(logits, 1.0) - truth).mean()
    assert error_after < 0.02 < 0.05 < error_before


def test_threshold_policy_reaches_its_target_on_validation():
    logits, y = _overconfident()
    fitted = fit_operating_points(logits, y, EvaluateConfig(target_sensitivity=0.95))
    p = apply_temperature(logits, fitted.temperature)
    assert np.mean(p[y == 1] >= fitted.threshold) >= 0.95
    assert fitted.threshold_policy == "target_sensitivity"
    youden = fit_operating_points(logits, y, EvaluateConfig(threshold_policy="youden"))
    assert youden.threshold == youden.operating_points["youden"] > fitted.threshold
    fixed = fit_operating_points(
        logits, y, EvaluateConfig(calibrate=False, threshold_policy="fixed")
    )
    assert (fixed.threshold, fixed.temperature) == (0.5, 1.0)


def test_temperature_stays_within_its_bounds_at_both_extremes():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, 500)
    noise = (rng.uniform(size=500) < 0.5).astype(int)  # labels unrelated to the logits
    assert fit_temperature(logits, noise) == pytest.approx(20.0, rel=1e-3)  # flatten fully
    separable = (logits > 0).astype(int)
    assert fit_temperature(logits, separable) == pytest.approx(0.05, rel=1e-3)  # sharpen fully
    assert fit_temperature(list(logits), [bool(v) for v in separable]) == pytest.approx(
        0.05, rel=1e-3
    )


def test_the_fit_records_what_it_was_fitted_on_and_for():
    logits, y = _overconfident(n=600)
    settings = EvaluateConfig(target_sensitivity=0.9, threshold_confidence=0.5, fixed_threshold=0.3,
                              threshold_policy="fixed")  # fmt: skip
    fitted = fit_operating_points(logits, list(y), settings)
    assert fitted.cases == {"n": 600, "n_positive": int(y.sum())}
    assert (fitted.target_sensitivity, fitted.threshold_confidence) == (0.9, 0.5)
    assert fitted.threshold_policy == "fixed" and fitted.threshold == 0.3
    assert fitted.operating_points["fixed"] == 0.3
    raw = 1 / (1 + np.exp(-logits))
    ece = fitted.validation_ece
    assert ece["uncalibrated"] == pytest.approx(expected_calibration_error(y, raw))
    calibrated = apply_temperature(logits, fitted.temperature)
    assert ece["calibrated"] == pytest.approx(expected_calibration_error(y, calibrated))
    uncalibrated = fit_operating_points(logits, y, EvaluateConfig(calibrate=False))
    assert uncalibrated.temperature == 1.0
    assert uncalibrated.validation_ece["calibrated"] == pytest.approx(ece["uncalibrated"])
