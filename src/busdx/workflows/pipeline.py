"""The training workflow: start or resume a run, train, calibrate, guard, evaluate.

:func:`train_run` is ``busdx train``: it owns the rules of a new run and of a resumed one and
runs the same under ``torchrun`` (each process trains its share; the first one evaluates).
:func:`train_and_evaluate` is the work itself, also used by each fold of
:mod:`busdx.workflows.crossval`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from busdx.config import Config, apply_overrides, load_config
from busdx.data.datasets import LabelledDataset
from busdx.devices import resolve_device
from busdx.distributed import broadcast, init_world
from busdx.errors import DataError
from busdx.evaluation.evaluate import evaluate_samples
from busdx.evaluation.radiologists import rank_categories
from busdx.inference.model_file import update_model_file
from busdx.inference.predictor import load_model
from busdx.layout import MODEL_FILE, SPLIT_FILE, TRAINING_CURVES
from busdx.reporting.figures import plot_training_curves
from busdx.results import Evaluation
from busdx.runs import (
    create_run_dir,
    load_run,
    prepare_dataset,
    resumed_config,
    run_sources,
    save_config,
    save_run,
)
from busdx.training.loop import fit
from busdx.training.scope_fit import fit_scope
from busdx.workflows.calibrate import calibrate_model

__all__ = ["train_and_evaluate", "train_run"]

logger = logging.getLogger(__name__)


def train_run(
    data: Sequence[str] | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    config_file: str | Path | None = None,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> tuple[Evaluation | None, Path]:
    """``busdx train``: a new run in ``out`` (default ``runs/<recipe>-<time>``) on ``data``,
    or the interrupted run ``resume`` continued (its own data and split; ``overrides`` such as
    more epochs are recorded in its config).

    Returns the test metrics and the run directory; under ``torchrun`` the helper processes
    train their share and return no metrics.
    """
    if resume:
        run_dir = Path(resume)
        config, info = load_run(run_dir)
        config = resumed_config(run_dir, config, list(overrides))
        config.data.split_file = str(run_dir / SPLIT_FILE)
        data = data or run_sources(info)
    elif not data:
        raise DataError("--data DIR is required (or --resume RUNDIR to continue a run)")
    else:
        config = apply_overrides(load_config(config_file, recipe=recipe), list(overrides))
    world = init_world(resolve_device(config.train.device))  # several processes: torchrun
    dataset = prepare_dataset(config, data)
    if resume:
        if world.is_main:
            save_config(run_dir, config)
    else:
        run_dir = create_run_dir(out, config.recipe) if world.is_main else None
        if world.is_main:
            save_run(run_dir, config, dataset)
        run_dir = broadcast(run_dir)
    if not world.is_main:  # a helper process: its share of the training, then done
        fit(config, dataset, run_dir, progress=False)
        return None, run_dir
    return train_and_evaluate(config, dataset, run_dir, progress=progress), run_dir


def train_and_evaluate(
    config: Config, dataset: LabelledDataset, run_dir: Path, *, progress: bool = True
) -> Evaluation:
    """Train (or resume), plot the curves, calibrate on val, evaluate on test (val if none)."""
    logger.info(
        "data %s (%s): %s",
        ", ".join(map(str, dataset.sites.values())) or dataset.root,
        dataset.layout,
        "; ".join(f"{split} {row}" for split, row in sorted(dataset.counts().items())),
    )
    started = time.perf_counter()
    history = fit(config, dataset, run_dir, progress=progress)
    logger.info("training took %.0f s", time.perf_counter() - started)
    plot_training_curves([asdict(r) for r in history], run_dir / TRAINING_CURVES)
    loaded = load_model(run_dir)
    fitted = calibrate_model(
        run_dir, loaded, dataset.subset("val"), config.evaluate, progress=progress
    )
    logger.info(
        "calibrated on validation: temperature %.3f; threshold %.3f (%s)",
        fitted.temperature,
        fitted.threshold,
        fitted.threshold_policy,
    )
    guard, arrays = fit_scope(
        loaded.model,
        loaded.preprocessing,
        [s.input for s in dataset.subset("train")],
        [s.input for s in dataset.subset("val")],
        device=loaded.device,
    )
    guarded = loaded.info.calibrated_with(fitted).replace(scope=guard)
    update_model_file(run_dir / MODEL_FILE, guarded, scope_arrays=arrays)
    logger.info("out-of-scope guard: Mahalanobis distance above %.1f", guard.threshold)
    loaded = load_model(run_dir)  # calibrated and guarded
    split = "test" if dataset.subset("test") else "val"
    tested = dataset.subset(split)
    return evaluate_samples(
        loaded,
        tested,
        run_dir,
        split=split,
        data_root=dataset.root,
        settings=config.evaluate,
        site="+".join(n for n in dataset.sites if any(s.site == n for s in tested)) or None,
        reader_ranks=rank_categories([s.birads for s in tested]),  # where a table gave BI-RADS
        progress=progress,
    )
