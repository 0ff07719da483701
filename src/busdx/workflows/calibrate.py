"""Calibrate a model to a site: temperature and threshold fitted on labelled cases.

:func:`calibrate_model` fits temperature and thresholds (after training, on the validation
split); :func:`calibrate_run` is ``busdx calibrate``: a copy of a run (or a bundled model)
recalibrated on a site's cases, with its last layer refitted too on request
(:mod:`busdx.workflows.head_refit`). Where the cases cannot show the target sensitivity, the
model's own threshold is kept as a floor.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busdx.bundled import output_home, resolve_run
from busdx.config import EvaluateConfig, apply_overrides
from busdx.data.datasets import Sample
from busdx.fileio import write_json
from busdx.inference.batch import file_logits
from busdx.inference.model_file import ModelInfo, update_model_file
from busdx.inference.predictor import Predictor, load_model
from busdx.layout import CONFIG_FILE, INFO_FILE, MODEL_FILE, SPLIT_FILE
from busdx.runs import create_run_dir, load_run, samples_for_split, save_config
from busdx.stats.calibration import (
    Calibration,
    apply_temperature,
    fit_operating_points,
    sensitivity_promise,
    transfer_threshold,
)
from busdx.workflows.head_refit import refit_head

__all__ = ["CalibratedRun", "calibrate_model", "calibrate_run"]


def calibrate_model(
    run_dir: Path,
    loaded: Predictor,
    val_samples: list[Sample],
    settings: EvaluateConfig,
    *,
    source: str = "validation split",
    refit: bool = False,
    progress: bool = True,
    prior: ModelInfo | None = None,
) -> Calibration:
    """Fit temperature and thresholds on ``val_samples``; store them in ``run_dir/model.pt``.

    After training these are the validation split's images; ``busdx calibrate`` passes a new
    site's own labelled cases (``source`` then says so). With ``refit`` the head's last layer
    is refitted on them too (:func:`busdx.workflows.head_refit.refit_head`; cross-fitted threshold).
    ``prior``: what the model file said before, whose threshold is kept as a floor where the
    cases cannot show the target sensitivity (:func:`_keep_floor`). ``loaded`` stays as it
    was: load the run again for the recalibrated model.
    """
    labels = np.array([s.label for s in val_samples])
    paths = [s.input for s in val_samples]
    updates = {}
    if refit:
        fitted, updates["state_dict"] = refit_head(
            loaded, paths, labels, settings, progress=progress
        )
    else:
        logits = file_logits(loaded, paths, progress=progress)
        fitted = fit_operating_points(logits, labels, settings)
    fitted = fitted.replace(source=source)
    if prior is not None and fitted.sensitivity_promise and not refit:
        probabilities = apply_temperature(logits, fitted.temperature)
        fitted = _keep_floor(fitted, prior, labels, probabilities, settings)
    update_model_file(run_dir / MODEL_FILE, loaded.info.calibrated_with(fitted), **updates)
    return fitted


@dataclass(frozen=True)
class CalibratedRun:
    """The new run of :func:`calibrate_run`, the site it was fitted to, and what was fitted
    (temperature, threshold, operating points, cases, the sensitivity promise; ``head_refit``
    with ``refit``; ``threshold_floor`` where the model's own threshold was kept as a floor)."""

    run_dir: Path
    site: str
    fitted: Calibration


def _keep_floor(fitted: Calibration, prior: ModelInfo, labels, probabilities,
                settings: EvaluateConfig) -> Calibration:  # fmt: skip
    """Where the local cases cannot show the target sensitivity at the asked confidence, never
    be less cautious than the threshold the model came with (for a bundled model: cross-fitted
    on hospitals it never saw). Measured in docs/calibration.md: with 50 local cases it raised
    the share of draws keeping 95% sensitivity from 0.63 to 1.00 at BrEaST and from 0.56 to 1.00
    at BUS-BRA, and left BUSI at 0.60."""
    if fitted.sensitivity_promise.kept or prior.calibration is None:
        return fitted
    floor = transfer_threshold(prior.threshold, prior.temperature, fitted.temperature)
    if floor >= fitted.threshold:
        return fitted
    return fitted.replace(
        threshold=floor,
        operating_points={**fitted.operating_points, "target_sensitivity": floor},
        threshold_floor={"local": fitted.threshold, "model": floor,
                         "source": prior.calibration.source},
        sensitivity_promise=sensitivity_promise(labels, probabilities, floor,
                                                settings.target_sensitivity,
                                                settings.threshold_confidence),
    )  # fmt: skip


def calibrate_run(
    run_dir: str | Path,
    data: str | Path | Sequence[str | Path],
    split: str = "all",
    *,
    site: str | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    refit: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> CalibratedRun:
    """``busdx calibrate``: copy a run (or a bundled model) into ``out`` (default
    ``RUNDIR-<site>``; ``busdx-output/NAME-<site>`` for a bundled model) and refit its
    temperature and threshold (and, with ``refit``, its last layer) on a site's labelled cases.

    The original is never changed. ``overrides`` are ``evaluate.*`` settings such as
    ``evaluate.target_sensitivity=0.98`` or ``evaluate.threshold_confidence=0.9``. With the
    target-sensitivity policy, where the cases cannot show the target at that confidence the
    model's own threshold is kept as a floor (see :func:`_keep_floor`).
    """
    run_dir = resolve_run(run_dir)
    config, info = load_run(run_dir)
    dataset = samples_for_split(run_dir, config, info, data, split)
    site = site or dataset.site
    home = output_home(run_dir)
    out = Path(out) if out else home.with_name(f"{home.name}-{site}")
    create_run_dir(out, config.recipe)  # refuses an existing run directory
    config = apply_overrides(config, list(overrides))
    for name in (CONFIG_FILE, SPLIT_FILE, MODEL_FILE):
        if (run_dir / name).is_file():  # a bundled model has no split
            shutil.copyfile(run_dir / name, out / name)
    save_config(out, config)
    info["calibrated"] = {"from_run": str(run_dir.resolve()), "data": str(dataset.root),
                          "site": site, "split": dataset.split, "n": len(dataset.samples),
                          "head_refitted": refit}  # fmt: skip
    write_json(out / INFO_FILE, info)
    source = f"site {site}: {len(dataset.samples)} labelled cases"
    loaded = load_model(out, device=device)
    fitted = calibrate_model(
        out, loaded, dataset.samples, config.evaluate, source=source, refit=refit,
        progress=progress, prior=loaded.info,
    )  # fmt: skip
    return CalibratedRun(out, site, fitted)
