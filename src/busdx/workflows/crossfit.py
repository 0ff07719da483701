"""What a cross-validation's out-of-fold predictions give: an honest check of the threshold
policy, and a model calibrated on them.

Every image of a CV is scored once by a model that never trained on it. Cross-fitting uses
that twice: :func:`leave_one_fold_out_threshold` decides each fold at the temperature and
threshold fitted on the other folds' scores (does the policy keep its promise on cases it
never saw?), and :func:`write_crossfit_ensemble` averages the fold models into one whose
temperature and threshold are fitted on all out-of-fold scores.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from busdx.config import Config
from busdx.data.datasets import LabelledDataset
from busdx.inference.model_file import read_model_file, write_model_file
from busdx.layout import ENSEMBLE_DIR, MODEL_FILE, fold_dir
from busdx.results import CrossFit
from busdx.runs import save_run
from busdx.stats.calibration import apply_temperature, fit_operating_points
from busdx.stats.metrics import DECISION_METRICS, binary_metrics, bootstrap_ci, is_positive

__all__ = ["leave_one_fold_out_threshold", "write_crossfit_ensemble"]

logger = logging.getLogger(__name__)


def leave_one_fold_out_threshold(
    config: Config, y_true: np.ndarray, logits: np.ndarray, fold_of: np.ndarray
) -> tuple[CrossFit, np.ndarray]:
    """How the cross-fitted threshold keeps its promise, honestly: each fold is decided with the
    temperature and threshold fitted on the other folds' out-of-fold predictions.

    Returns the summary (sensitivity, specificity with CIs, each fold's threshold) and each
    image's decision (1: called positive)."""
    called = np.zeros(len(y_true))
    thresholds = []
    for fold in np.unique(fold_of):
        rest = fold_of != fold
        fitted = fit_operating_points(logits[rest], y_true[rest], config.evaluate)
        probabilities = apply_temperature(logits[~rest], fitted.temperature)
        called[~rest] = is_positive(probabilities, fitted.threshold)
        thresholds.append(fitted.threshold)
    settings = config.evaluate
    decided = binary_metrics(y_true, called)
    decided_ci = bootstrap_ci(y_true, called, threshold=0.5, n_resamples=settings.n_bootstrap,
                              level=settings.ci_level, seed=settings.seed)  # fmt: skip
    summary = CrossFit.model_validate({
        "policy": settings.threshold_policy,
        "target_sensitivity": settings.target_sensitivity,
        "threshold_confidence": settings.threshold_confidence,
        "thresholds": thresholds,
        **{key: decided[key] for key in DECISION_METRICS},
        "ci": {key: decided_ci[key] for key in DECISION_METRICS},
        "confusion": decided["confusion"],
    })  # fmt: skip
    return summary, called


def write_crossfit_ensemble(
    config: Config,
    dataset: LabelledDataset,
    out_dir: Path,
    n_folds: int,
    y_true: np.ndarray,
    oof_logits: np.ndarray,
) -> Path:
    """``out_dir/ensemble``: a run whose model averages the fold models' logits, with the
    temperature and threshold fitted on all out-of-fold predictions (cross-fitting).

    Every image was a test image of exactly one fold model, so the calibration sees as many
    cases as the dataset holds, none scored by a model that trained on it. Its split marks every
    image ``train``: evaluate it on other data (``busdx evaluate --data SITE --split all``).
    """
    run_dir = out_dir / ENSEMBLE_DIR
    run_dir.mkdir(exist_ok=True)
    folds = [read_model_file(fold_dir(out_dir, k) / MODEL_FILE) for k in range(n_folds)]
    state = {
        f"members.{index}.{key}": tensor
        for index, (_, tensors) in enumerate(folds)
        for key, tensor in tensors["state_dict"].items()
    }
    fitted = fit_operating_points(oof_logits, y_true, config.evaluate)
    source = f"out-of-fold predictions of {n_folds}-fold CV"
    first, first_tensors = folds[0]  # its guard: the ensemble's features are the first member's
    info = first.calibrated_with(fitted.replace(source=source)).replace(
        ensemble_size=n_folds, provenance={"epoch": None, "val_loss": None}
    )
    guard = {"scope_arrays": first_tensors["scope_arrays"]} if first.scope else {}
    write_model_file(run_dir / MODEL_FILE, info, state_dict=state, **guard)
    everything = replace(dataset, samples=[replace(s, split="train") for s in dataset.samples])
    save_run(run_dir, config, everything)
    logger.info(
        "cross-fitted ensemble of %d fold models: %s (temperature %.3f, threshold %.3f)",
        n_folds,
        run_dir,
        fitted.temperature,
        fitted.threshold,
    )
    return run_dir
