"""Temperature scaling and decision thresholds, fitted on validation data only.

Temperature scaling (Guo et al., ICML 2017) divides the logit by one scalar ``T`` fitted to
minimise the validation negative log-likelihood: it changes how confident the probabilities are,
never their ranking, so ROC AUC is unchanged. Thresholds are then chosen on the calibrated
validation probabilities: for a target sensitivity (a missed cancer costs more than a biopsy) or
at Youden's J. Test data is never used for either.

A sensitivity promised on a few local cases is itself uncertain: :func:`sensitivity_promise`
states it with its confidence. A threshold at or below the lowest of ``d`` detected out of
``n`` malignant cases is a distribution-free lower tolerance bound: the probability that it
keeps sensitivity ``s`` on new cases is ``P(Binomial(n, 1 - s) >= n - d + 1)``, the same test
as the one-sided Clopper-Pearson bound :func:`busdx.stats.metrics.threshold_for_sensitivity` uses.
With every case detected that is ``1 - s**n``: 95% sensitivity at 90% confidence needs 45
malignant cases, whatever the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.special import expit, logit

from busdx.config import EvaluateConfig
from busdx.results import SensitivityPromise
from busdx.stats.metrics import (
    expected_calibration_error,
    is_positive,
    sensitivity_lower_bound,
    threshold_for_sensitivity,
    youden_threshold,
)

__all__ = [
    "Calibration",
    "apply_temperature",
    "fit_operating_points",
    "fit_temperature",
    "positives_needed",
    "sensitivity_promise",
    "transfer_threshold",
]


class Calibration(BaseModel):
    """What was fitted after training, and on what: the temperature, the threshold chosen by
    ``threshold_policy`` and every policy's candidate (``operating_points``), what the threshold
    promises, the cases' counts and ECE before and after. A model file carries it
    (:class:`busdx.inference.model_file.ModelInfo`); :func:`fit_operating_points` makes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float
    threshold: float
    threshold_policy: str = "fixed"  # target_sensitivity, youden or fixed
    target_sensitivity: float | None = None
    threshold_confidence: float | None = None
    operating_points: dict[str, float] = {}  # each policy's threshold on the same cases
    sensitivity_promise: SensitivityPromise | None = None
    cases: dict[str, int] | None = None  # n, n_positive
    validation_ece: dict[str, float] | None = None  # uncalibrated, calibrated
    source: str = "the validation split"  # or a site's cases, or out-of-site predictions
    threshold_floor: dict[str, Any] | None = None  # busdx calibrate kept the model's own
    head_refit: dict[str, Any] | None = None  # busdx calibrate --refit-head

    @property
    def promised_sensitivity(self) -> float | None:
        """The sensitivity the threshold was chosen for (None: another policy)."""
        return self.target_sensitivity if self.threshold_policy == "target_sensitivity" else None

    def replace(self, **changes: Any) -> Calibration:
        """A copy with some fields changed, validated."""
        return Calibration.model_validate({**dict(self), **changes})


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logit / T)``."""
    return expit(np.asarray(logits, dtype=float) / temperature)


def _nll(log_t: float, logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits / math.exp(log_t)
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, computed stably
    return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in [0.05, 20] minimising the negative log-likelihood of ``labels``."""
    from scipy.optimize import minimize_scalar  # 0.2 s to import: only when fitting

    logits = np.asarray(logits, dtype=float)
    labels = np.asarray(labels, dtype=int)
    result = minimize_scalar(
        _nll, bounds=(math.log(0.05), math.log(20.0)), args=(logits, labels), method="bounded"
    )
    return float(math.exp(result.x))


def fit_operating_points(
    logits: np.ndarray, labels: np.ndarray, settings: EvaluateConfig
) -> Calibration:
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
    threshold = points[settings.threshold_policy]
    promise = None
    if settings.threshold_policy == "target_sensitivity" and labels.any():
        promise = sensitivity_promise(labels, probabilities, threshold,
                                      settings.target_sensitivity,
                                      settings.threshold_confidence)  # fmt: skip
    return Calibration(
        temperature=temperature,
        threshold=threshold,
        threshold_policy=settings.threshold_policy,
        sensitivity_promise=promise,
        operating_points=points,
        target_sensitivity=settings.target_sensitivity,
        threshold_confidence=settings.threshold_confidence,
        cases={"n": len(labels), "n_positive": int(labels.sum())},
        validation_ece={
            "uncalibrated": expected_calibration_error(labels, apply_temperature(logits, 1.0)),
            "calibrated": expected_calibration_error(labels, probabilities),
        },
    )


def positives_needed(target: float, confidence: float) -> int | None:
    """Malignant cases, all detected, that show sensitivity ``target`` at ``confidence``
    (distribution-free): the smallest ``n`` with ``1 - target**n >= confidence``; None for a
    target of 1, which no finite number of cases shows."""
    if confidence <= 0:
        return 1
    if target >= 1:
        return None
    return math.ceil(math.log(1 - confidence) / math.log(target) - 1e-9)


def sensitivity_promise(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    target: float,
    confidence: float,
) -> SensitivityPromise:
    """What ``threshold`` promises on new cases like these labelled ones: the sensitivity
    guaranteed at ``confidence`` (one-sided Clopper-Pearson), the confidence that sensitivity
    reaches ``target``, and how many malignant cases would support ``target`` at ``confidence``.
    """
    from scipy.stats import binom  # imported here: scipy.stats takes 0.4 s to import

    labels = np.asarray(labels, dtype=int)
    positives = int(labels.sum())
    if positives == 0:
        raise ValueError("a sensitivity promise needs malignant cases")
    called = is_positive(np.asarray(probabilities), threshold)
    detected = int(called[labels == 1].sum())
    needed = positives_needed(target, confidence)
    return SensitivityPromise(
        target=target,
        confidence=confidence,
        positives=positives,
        detected=detected,
        guaranteed=float(sensitivity_lower_bound(np.array([detected]), positives, confidence)[0]),
        confidence_of_target=float(binom.sf(positives - detected, positives, 1 - target)),
        positives_needed=needed,
        more_positives_needed=None if needed is None else max(0, needed - positives),
        specificity=float(np.mean(~called[labels == 0])) if (labels == 0).any() else math.nan,
    )


def transfer_threshold(threshold: float, temperature: float, new_temperature: float) -> float:
    """The same raw-logit cut as probability ``threshold`` at ``temperature``, expressed as a
    probability at ``new_temperature``."""
    cut = float(logit(np.clip(threshold, 1e-12, 1 - 1e-12))) * temperature
    return float(expit(cut / new_temperature))
