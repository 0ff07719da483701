"""Cross-validation (``busdx cv``): grouped stratified k-fold, or leave one site out.

Near-duplicate groups and patients stay within one fold. Each fold is a full run directory
(``fold-<k>/``) trained, calibrated on its own validation split and evaluated on its test fold;
re-running the same command resumes unfinished folds. The summary pools the out-of-fold
predictions, reports each site separately, and checks the decision threshold by cross-fitting:
each fold's cases are decided at a threshold fitted on the other folds' scores.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from busdx.config import Config, apply_overrides, load_config
from busdx.data.datasets import LabelledDataset, Sample, draw_split
from busdx.errors import ConfigError, DataError, RunDirError
from busdx.evaluation.radiologists import compare_with_readers, rank_categories
from busdx.fileio import atomic_write_text
from busdx.layout import (
    CONFIG_FILE,
    CV_METRICS_FILE,
    CV_ROC_CURVE,
    FOLDS_FILE,
    INFO_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    fold_dir,
)
from busdx.reporting.figures import plot_roc_curve
from busdx.results import (
    CROSS_FITTED,
    EACH_FOLD,
    CVSummary,
    Evaluation,
    Metrics,
    OneClassGroup,
    SiteSummary,
)
from busdx.runs import prepare_dataset, save_config, save_run
from busdx.stats.metrics import (
    DECISION_METRICS,
    SCORE_METRICS,
    binary_metrics,
    bootstrap_ci,
    roc_band,
)
from busdx.workflows.crossfit import leave_one_fold_out_threshold, write_crossfit_ensemble
from busdx.workflows.pipeline import train_and_evaluate

__all__ = [
    "assign_folds",
    "cross_validate",
    "cv_config",
    "format_cv",
    "run_cv",
]

logger = logging.getLogger(__name__)


def cv_config(
    out: Path, asked: Config, overrides: Sequence[str] = (), recipe: str | None = None
) -> Config:
    """The config of a CV in ``out``: ``asked`` (the recipe or file with ``overrides``) for a
    new folder; for a folder to resume, its saved config with ``overrides`` applied.

    Resuming, only ``evaluate.*`` settings may change: they change only what is computed from
    the fold predictions (the summary's cross-fitted check and the ensemble's calibration); a
    different training setting, or another ``recipe`` named, would mix two experiments in one
    folder and is refused.
    """
    if out.exists() and not (out / FOLDS_FILE).is_file() and any(out.iterdir()):
        raise RunDirError(
            f"{out} exists and is not a cross-validation folder; choose another --out"
        )
    if not (out / CONFIG_FILE).is_file():
        return asked
    saved = load_config(out / CONFIG_FILE)
    config = apply_overrides(saved, list(overrides))
    training = {k: v for k, v in config.to_dict().items() if k != "evaluate"}
    if training != {k: v for k, v in saved.to_dict().items() if k != "evaluate"} or (
        recipe and recipe != saved.recipe
    ):
        raise ConfigError(
            f"{out} holds a cross-validation trained with other settings; only evaluate.* "
            "settings can change when resuming it: choose a new --out to train differently"
        )
    return config


def run_cv(
    data: Sequence[str],
    out: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    n_folds: int = 5,
    group_by: str = "duplicates",
    progress: bool = True,
) -> tuple[CVSummary, Path]:
    """``busdx cv``: cross-validate a recipe on ``data`` into ``out`` (default
    ``runs/cv-<recipe>``); the same call again resumes the folds left unfinished."""
    asked = apply_overrides(load_config(config_file, recipe=recipe), list(overrides))
    out = Path(out) if out else Path("runs") / f"cv-{asked.recipe}"
    config = cv_config(out, asked, overrides, recipe)
    dataset = prepare_dataset(config, data, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config)
    summary = cross_validate(
        config, dataset, out, n_folds=n_folds, group_by=group_by, progress=progress
    )
    return summary, out


def assign_folds(
    dataset: LabelledDataset, n_folds: int, seed: int, *, group_by: str = "duplicates"
) -> list[int]:
    """Fold of each sample.

    ``group_by="duplicates"``: stratified by class (and site, with several), near-duplicate
    groups kept in one fold. ``group_by="site"``: one fold per site (leave one site out);
    ``n_folds`` must then equal the number of sites.
    """
    sites = list(dataset.sites) or [""]
    site_index = np.array([sites.index(s.site) if s.site in sites else 0 for s in dataset.samples])
    if group_by == "site":
        if len(sites) < 2 or n_folds != len(sites):
            raise DataError(
                f"leave-one-site-out needs at least two sites and --folds equal to their number "
                f"(got {len(sites)} site(s), --folds {n_folds}); repeat --data for each site"
            )
        return site_index.tolist()
    labels = np.array([s.label for s in dataset.samples])
    strata = labels + 2 * site_index  # the classes of each site spread over the folds
    groups = np.array([i if s.group is None else s.group for i, s in enumerate(dataset.samples)])
    if min(np.bincount(labels, minlength=2)) < n_folds:
        raise DataError(f"each class needs at least {n_folds} images for {n_folds} folds")
    folds = np.zeros(len(labels), dtype=int)
    # imported here, not at the top: scikit-learn takes 1-2 s to import
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test_index) in enumerate(splitter.split(labels, strata, groups)):
        folds[test_index] = fold
    return folds.tolist()


def _fold_dataset(
    dataset: LabelledDataset, folds: list[int], fold: int, config: Config
) -> LabelledDataset:
    test = [
        replace(s, split="test") for s, f in zip(dataset.samples, folds, strict=True) if f == fold
    ]
    rest = [s for s, f in zip(dataset.samples, folds, strict=True) if f != fold]
    groups = [i if s.group is None else s.group for i, s in enumerate(rest)]
    rest = draw_split(
        rest,
        val_fraction=config.data.val_fraction,
        test_fraction=0.0,
        seed=config.train.seed + fold,
        groups=groups,
    )
    return replace(dataset, samples=sorted(rest + test, key=lambda s: s.relpath))


def cross_validate(
    config: Config,
    dataset: LabelledDataset,
    out_dir: Path,
    *,
    n_folds: int = 5,
    group_by: str = "duplicates",
    progress: bool = True,
) -> CVSummary:
    """Grouped, stratified k-fold (or leave-one-site-out) cross-validation; per-fold, pooled
    and per-site metrics with CIs.

    Near-duplicate groups stay within one fold (``group_by="site"``: each fold is one site).
    Each fold trains on the other folds (minus a grouped validation split used for checkpoint
    selection, calibration and the threshold) and is tested once. Folds with a
    ``metrics.json`` are skipped, so an interrupted run resumes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(dataset, n_folds, config.train.seed, group_by=group_by)
    _write_folds(out_dir / FOLDS_FILE, dataset, folds)
    per_fold, y_true, y_prob, decisions, logits, fold_of, paths = [], [], [], [], [], [], []
    for fold in range(n_folds):
        run_dir = fold_dir(out_dir, fold)
        per_fold.append(_run_fold(config, dataset, folds, fold, run_dir, progress=progress))
        with (run_dir / PREDICTIONS_FILE).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        y_true += [dataset.class_names.index(r["label"]) for r in rows]
        y_prob += [float(r["probability_malignant"]) for r in rows]
        decisions += [float(r["predicted"] == dataset.class_names[1]) for r in rows]
        logits += [float(r.get("logit") or "nan") for r in rows]
        fold_of += [fold] * len(rows)
        paths += [r["path"] for r in rows]
    y_true_array, logits_array = np.array(y_true), np.array(logits)
    decided = {EACH_FOLD: np.array(decisions)}
    crossfit = not np.isnan(logits_array).any()
    extra: dict[str, Any] = {"group_by": group_by}
    if crossfit:
        extra["crossfit"], decided[CROSS_FITTED] = leave_one_fold_out_threshold(
            config, y_true_array, logits_array, np.array(fold_of)
        )
    else:
        logger.warning("fold predictions without logits (an older busdx): no cross-fitted model")
    by_path = {s.relpath: s for s in dataset.samples}
    tested = [by_path[path] for path in paths]
    if len({s.site for s in tested}) > 1:
        extra["per_site"] = _per_site(config, tested, y_true_array, np.array(y_prob), decided)
    summary = _summarise(config, per_fold, y_true_array, np.array(y_prob), decided, out_dir, extra)
    if crossfit:
        write_crossfit_ensemble(config, dataset, out_dir, n_folds, y_true_array, logits_array)
    return summary


def _write_folds(path: Path, dataset: LabelledDataset, folds: list[int]) -> None:
    """``folds.csv``: each image's fold (checked against a saved one when resuming)."""
    _check_saved_folds(path, dataset, folds)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "group", "fold", "site"])
    for sample, fold in zip(dataset.samples, folds, strict=True):
        label = dataset.class_names[sample.label]
        writer.writerow([sample.relpath, label, sample.group, fold, sample.site])
    atomic_write_text(path, buffer.getvalue())


def _run_fold(
    config: Config,
    dataset: LabelledDataset,
    folds: list[int],
    fold: int,
    fold_dir: Path,
    *,
    progress: bool,
) -> Evaluation:
    """Train and test one fold, or read its metrics if a previous call finished it."""
    if (fold_dir / METRICS_FILE).is_file():
        return Evaluation.read(fold_dir / METRICS_FILE)
    fold_data = _fold_dataset(dataset, folds, fold, config)
    fold_dir.mkdir(exist_ok=True)
    if not (fold_dir / INFO_FILE).is_file():
        save_run(fold_dir, config, fold_data)
    logger.info("fold %d/%d", fold + 1, max(folds) + 1)
    return train_and_evaluate(config, fold_data, fold_dir, progress=progress)


def _check_saved_folds(path: Path, dataset: LabelledDataset, folds: list[int]) -> None:
    """A resumed CV must partition the images as it did: else finished folds would be mixed
    with folds of another partition (other --folds, --group-by or data)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        saved = {row["path"]: row["fold"] for row in csv.DictReader(handle)}
    now = {s.relpath: str(f) for s, f in zip(dataset.samples, folds, strict=True)}
    if saved != now:
        raise DataError(
            f"{path.parent} holds a cross-validation with other folds (another --folds, "
            "--group-by or data); choose a new --out"
        )


def _per_site(
    config: Config,
    tested: list[Sample],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    decided: dict[str, np.ndarray],
) -> dict[str, SiteSummary | OneClassGroup]:
    """Each site's ranking (AUC with CI) and each decision rule's sensitivity and specificity;
    the same for each scanner of a site that names them, and the readers' BI-RADS beside the
    model where every image of the site has one."""
    settings = config.evaluate
    ci = dict(n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
    sites = np.array([s.site for s in tested])
    scanners = np.array([s.scanner for s in tested])
    table: dict[str, SiteSummary | OneClassGroup] = {}
    for site in sorted(set(sites)):
        mask = sites == site
        row = _subset_row(y_true, y_prob, decided, mask, ci)
        ranks = rank_categories([s.birads for s, m in zip(tested, mask, strict=True) if m])
        if ranks is not None and "note" not in row:
            row["readers"] = compare_with_readers(y_true[mask], y_prob[mask], ranks, **ci)
        site_scanners = sorted(set(scanners[mask]) - {""})
        if site_scanners and "note" not in row:
            row["per_scanner"] = {
                scanner: _row_model(
                    _subset_row(y_true, y_prob, decided, mask & (scanners == scanner), ci)
                )
                for scanner in site_scanners
            }
        table[site] = _row_model(row)
    return table


def _row_model(row: dict[str, Any]) -> SiteSummary | OneClassGroup:
    return OneClassGroup.model_validate(row) if "note" in row else SiteSummary.model_validate(row)


def _subset_row(
    y_true: np.ndarray, y_prob: np.ndarray, decided: dict[str, np.ndarray], mask: np.ndarray,
    ci: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Ranking with CI and each decision rule's sensitivity and specificity on ``mask`` (a
    subset of one class only, such as a scanner that saw no cancer, has counts alone)."""
    row: dict[str, Any] = {"n": int(mask.sum()), "n_positive": int(y_true[mask].sum())}
    if len(set(y_true[mask])) < 2:
        return {**row, "note": "one class only: no ROC AUC, sensitivity or specificity"}
    ranking = binary_metrics(y_true[mask], y_prob[mask])
    ranking_ci = bootstrap_ci(y_true[mask], y_prob[mask], threshold=0.5, **ci)
    row |= {key: ranking[key] for key in SCORE_METRICS}
    row["ci"] = {key: ranking_ci[key] for key in SCORE_METRICS}
    for rule, calls in decided.items():
        metrics = binary_metrics(y_true[mask], calls[mask])
        row[rule] = {key: metrics[key] for key in ("sensitivity", "specificity")}
    return row


FOLD_KEYS = SCORE_METRICS + DECISION_METRICS


def _summarise(config, per_fold, y_true, y_prob, decided, out_dir, extra) -> CVSummary:
    decisions = decided[EACH_FOLD]
    settings = config.evaluate
    ci = dict(n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
    ranking = binary_metrics(y_true, y_prob)  # threshold-free metrics of the pooled scores
    ranking_ci = bootstrap_ci(y_true, y_prob, threshold=0.5, **ci)
    decided = binary_metrics(y_true, decisions)  # each fold at its own validation threshold
    decided_ci = bootstrap_ci(y_true, decisions, threshold=0.5, **ci)
    pooled = {key: ranking[key] for key in SCORE_METRICS}
    pooled |= {key: decided[key] for key in DECISION_METRICS}
    pooled_ci = {key: ranking_ci[key] for key in SCORE_METRICS}
    pooled_ci |= {key: decided_ci[key] for key in DECISION_METRICS}
    table = {key: [getattr(fold, key) for fold in per_fold] for key in FOLD_KEYS}
    summary = CVSummary.model_validate({
        "folds": len(per_fold),
        "n": len(y_true),
        "n_positive": int(y_true.sum()),
        "threshold_policy": settings.threshold_policy,
        "ci_level": settings.ci_level,
        "pooled": pooled,
        "pooled_ci": pooled_ci,
        "pooled_confusion": decided["confusion"],
        "per_fold": table,
        "mean": {k: float(np.nanmean(np.array(v, dtype=float))) for k, v in table.items()},
        "sd": {k: float(np.nanstd(np.array(v, dtype=float), ddof=1)) for k, v in table.items()},
        **extra,
    })  # fmt: skip
    summary.write(out_dir / CV_METRICS_FILE)
    point = Metrics.model_validate({**decided, "threshold": None})
    plot_roc_curve(
        y_true,
        y_prob,
        {EACH_FOLD: point},
        out_dir / CV_ROC_CURVE,
        title=f"ROC curve {len(per_fold)}-fold CV, out of fold",
        band=roc_band(y_true, y_prob, **ci),
        ci_level=settings.ci_level,
    )
    return summary


def format_cv(summary: CVSummary) -> str:
    """Terminal table: pooled value with CI, and mean ± sd over folds."""
    lines = [
        f"{summary.folds}-fold grouped CV: n={summary.n} ({summary.n_positive} positive); "
        f"pooled [{summary.ci_level:.0%} CI]  |  mean ± sd over folds"
    ]
    for key, value in summary.pooled.items():
        ci = summary.pooled_ci[key]
        spread = f"{summary.mean[key]:.3f} ± {summary.sd[key]:.3f}" if key in summary.mean else ""
        lines.append(f"  {key:<18} {value:.3f} [{ci.low:.3f}, {ci.high:.3f}]  |  {spread}")
    if summary.crossfit is not None:
        fit = summary.crossfit
        lines.append(
            f"cross-fitted threshold (each fold decided by the other folds' out-of-fold fit; "
            f"target sensitivity {fit.target_sensitivity:.2f}, confidence "
            f"{fit.threshold_confidence:.2f}):"
        )
        for key in ("sensitivity", "specificity"):
            ci = fit.ci[key]
            lines.append(f"  {key:<18} {getattr(fit, key):.3f} [{ci.low:.3f}, {ci.high:.3f}]")
    for site, row in (summary.per_site or {}).items():
        lines += _format_site(site, row)
    return "\n".join(lines)


def _format_site(site: str, row: SiteSummary | OneClassGroup) -> list[str]:
    if isinstance(row, OneClassGroup):
        return [f"site {site} (n={row.n}, {row.n_positive} positive): {row.note}"]
    auc = row.ci["roc_auc"]
    rules = "; ".join(
        f"{rule}: sensitivity {point.sensitivity:.3f}, specificity {point.specificity:.3f}"
        for rule, point in ((EACH_FOLD, row.each_fold), (CROSS_FITTED, row.cross_fitted))
        if point is not None
    )
    lines = [
        f"site {site} (n={row.n}, {row.n_positive} positive): ROC AUC "
        f"{row.roc_auc:.3f} [{auc.low:.3f}, {auc.high:.3f}]; {rules}"
    ]
    if row.readers is not None:
        delta = row.readers.delta_roc_auc
        lines.append(
            f"  readers' BI-RADS ROC AUC {row.readers.readers_roc_auc:.3f}; model - readers "
            f"{delta.delta:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]"
        )
    for scanner, sub in (row.per_scanner or {}).items():
        value = sub.note if isinstance(sub, OneClassGroup) else f"ROC AUC {sub.roc_auc:.3f}"
        lines.append(f"  scanner {scanner} (n={sub.n}, {sub.n_positive} positive): {value}")
    return lines
