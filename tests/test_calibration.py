import numpy as np
import pytest

from busdx.calibration import apply_temperature, fit_operating_points, fit_temperature
from busdx.config import EvaluateConfig


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
    assert fitted["validation_ece"]["calibrated"] < fitted["validation_ece"]["uncalibrated"] / 2
    error_after = np.abs(apply_temperature(logits, fitted["temperature"]) - truth).mean()
    error_before = np.abs(apply_temperature(logits, 1.0) - truth).mean()
    assert error_after < 0.02 < 0.05 < error_before


def test_threshold_policy_reaches_its_target_on_validation():
    logits, y = _overconfident()
    fitted = fit_operating_points(logits, y, EvaluateConfig(target_sensitivity=0.95))
    p = apply_temperature(logits, fitted["temperature"])
    assert np.mean(p[y == 1] >= fitted["threshold"]) >= 0.95
    assert fitted["threshold_policy"] == "target_sensitivity"
    youden = fit_operating_points(logits, y, EvaluateConfig(threshold_policy="youden"))
    assert youden["threshold"] == youden["operating_points"]["youden"] > fitted["threshold"]
    fixed = fit_operating_points(
        logits, y, EvaluateConfig(calibrate=False, threshold_policy="fixed")
    )
    assert (fixed["threshold"], fixed["temperature"]) == (0.5, 1.0)
