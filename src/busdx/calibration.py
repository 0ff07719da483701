"""Temperature scaling and decision thresholds, fitted on validation data only.

Temperature scaling (Guo et al., ICML 2017) divides the logit by one scalar ``T`` fitted to
minimise the validation negative log-likelihood: it changes how confident the probabilities are,
never their ranking, so ROC AUC is unchanged. Thresholds are then chosen on the calibrated
validation probabilities: for a target sensitivity (a missed cancer costs more than a biopsy) or
at Youden's J. Test data is never used for either.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from busdx.config import EvaluateConfig
from busdx.metrics import expected_calibration_error, threshold_for_sensitivity, youden_threshold

__all__ = ["apply_temperature", "fit_operating_points", "fit_temperature"]


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logit / T)``."""
    return expit(np.asarray(logits, dtype=float) / temperature)


def _nll(log_t: float, logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits / math.exp(log_t)
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, computed stably
    return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in [0.05, 20] minimising the negative log-likelihood of ``labels``."""
    logits = np.asarray(logits, dtype=float)
    labels = np.asarray(labels, dtype=int)
    result = minimize_scalar(
        _nll, bounds=(math.log(0.05), math.log(20.0)), args=(logits, labels), method="bounded"
    )
    return float(math.exp(result.x))


def fit_operating_points(
    logits: np.ndarray, labels: np.ndarray, settings: EvaluateConfig
) -> dict[str, object]:
    """Temperature, the candidate thresholds and the chosen one, from validation data."""
    labels = np.asarray(labels, dtype=int)
    temperature = fit_temperature(logits, labels) if settings.calibrate else 1.0
    probabilities = apply_temperature(logits, temperature)
    points = {
        "target_sensitivity": threshold_for_sensitivity(
            labels,
            probabilities,
            settings.target_sensitivity,
            confidence=settings.threshold_confidence,
        ),
        "youden": youden_threshold(labels, probabilities),
        "fixed": settings.fixed_threshold,
    }
    return {
        "temperature": temperature,
        "threshold_policy": settings.threshold_policy,
        "threshold": points[settings.threshold_policy],
        "operating_points": points,
        "target_sensitivity": settings.target_sensitivity,
        "threshold_confidence": settings.threshold_confidence,
        "calibration_cases": {"n": len(labels), "n_positive": int(labels.sum())},
        "validation_ece": {
            "uncalibrated": expected_calibration_error(labels, apply_temperature(logits, 1.0)),
            "calibrated": expected_calibration_error(labels, probabilities),
        },
    }
