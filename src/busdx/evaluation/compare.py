"""Two models on the same images: a paired bootstrap of their difference (``busdx compare``).

Each side is an evaluation folder (``busdx evaluate``), a run directory (its test split) or a
``busdx cv`` folder (its pooled out-of-fold predictions). Resamples are drawn per case, the same
for both models, so the shared difficulty of the cases cancels out of the difference.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from busdx.bundled import output_home, resolve_run
from busdx.config import EvaluateConfig
from busdx.errors import DataError
from busdx.evaluation.local_check import local_evaluations
from busdx.layout import EVAL_DIR, FOLD_GLOB, FOLDS_FILE, METRICS_FILE, PREDICTIONS_FILE
from busdx.results import Compared, Comparison, Evaluation
from busdx.stats.metrics import binary_metrics, paired_bootstrap

__all__ = ["compare_evaluations", "format_comparison"]


def _read_predictions(folder: Path) -> tuple[Evaluation, dict[str, tuple[str, float, bool]]]:
    """An evaluation's metrics and ``{path: (label, probability, called positive)}``; for a
    ``busdx cv`` folder, every fold's test predictions (each at its fold's threshold)."""
    if (folder / FOLDS_FILE).is_file():
        parts = [_read_predictions(fold) for fold in sorted(folder.glob(FOLD_GLOB))]
        if not parts:
            raise DataError(f"{folder} holds no finished fold (fold-*/): finish the CV first")
        rows = {path: row for _, fold_rows in parts for path, row in fold_rows.items()}
        return parts[0][0].model_copy(update={"split": "cv out-of-fold"}), rows
    metrics_path, predictions_path = folder / METRICS_FILE, folder / PREDICTIONS_FILE
    if not metrics_path.is_file() or not predictions_path.is_file():
        raise DataError(
            f"{folder} holds no evaluation ({METRICS_FILE} + predictions.csv): give a run "
            "directory or an evaluation folder written by busdx evaluate"
        )
    metrics = Evaluation.read(metrics_path)
    with predictions_path.open(newline="", encoding="utf-8") as handle:
        rows = {
            row["path"]: (
                row["label"],
                float(row["probability_malignant"]),
                row["predicted"] == metrics.positive_class,
            )
            for row in csv.DictReader(handle)
        }
    return metrics, rows


def _evaluation_folder(given: str | Path) -> Path:
    """A folder as given, or a bundled model's name: its one evaluation under
    ``busdx-output/NAME/eval`` (the package holds none)."""
    path = Path(given)
    if path.exists():
        return path
    run_dir = resolve_run(given)
    found = local_evaluations(run_dir)
    if len(found) != 1:
        where = output_home(run_dir) / EVAL_DIR
        raise DataError(
            f"{given} is a bundled model with {len(found)} evaluations under {where}: "
            + ("name one of them: " + ", ".join(map(str, found)) if found else
               f"evaluate it first (busdx evaluate --run {given} --data DIR)")
        )  # fmt: skip
    return found[0]


def compare_evaluations(
    folder_a: Path, folder_b: Path, settings: EvaluateConfig, *, out: Path | None = None
) -> Comparison:
    """Paired bootstrap of two models on the same images: ΔAUC and the difference in each
    decision metric at each model's own threshold (A - B).

    Each folder is an evaluation written by ``busdx evaluate``, a run directory (whose test
    evaluation is at its top), a bundled model's name (its one evaluation) or a ``busdx cv``
    folder (its pooled out-of-fold predictions:
    two CVs on the same folds compare paired); images are matched by path, and both must have
    scored the same set. Resamples are drawn per case, the same for both models, so the shared
    difficulty of the cases cancels out of the difference.
    """
    folder_a, folder_b = _evaluation_folder(folder_a), _evaluation_folder(folder_b)
    metrics_a, rows_a = _read_predictions(folder_a)
    metrics_b, rows_b = _read_predictions(folder_b)
    if set(rows_a) != set(rows_b):
        only = sorted(set(rows_a) ^ set(rows_b))
        raise DataError(
            f"{folder_a} and {folder_b} scored different images ({len(only)} not in both, e.g. "
            f"{only[0]!r}): evaluate both models on the same data and split"
        )
    paths = sorted(rows_a)
    if any(rows_a[p][0] != rows_b[p][0] for p in paths):
        raise DataError(f"{folder_a} and {folder_b} label some images differently")
    y_true = np.array([int(rows_a[p][0] == metrics_a.positive_class) for p in paths])
    columns = {
        name: np.array([[rows[p][1], rows[p][2]] for p in paths], dtype=float)
        for name, rows in (("a", rows_a), ("b", rows_b))
    }
    ci = dict(n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
    deltas = {
        key: paired_bootstrap(
            y_true,
            columns["a"][:, 1],
            columns["b"][:, 1],
            lambda y, s, k=key: binary_metrics(y, s, threshold=0.5)[k],
            **ci,
        )
        for key in ("sensitivity", "specificity")
    }
    result = Comparison(
        a=Compared(folder=str(folder_a), site=metrics_a.site, split=metrics_a.split),
        b=Compared(folder=str(folder_b), site=metrics_b.site, split=metrics_b.split),
        n=len(paths),
        n_positive=int(y_true.sum()),
        ci_level=settings.ci_level,
        roc_auc=paired_bootstrap(y_true, columns["a"][:, 0], columns["b"][:, 0], **ci),
        **deltas,
    )
    if out is not None:
        result.write(out)
    return result


def format_comparison(result: Comparison) -> str:
    """Terminal summary of :func:`compare_evaluations`."""
    lines = [
        f"A: {result.a.folder}\nB: {result.b.folder}",
        f"same {result.n} images ({result.n_positive} positive); A - B, "
        f"{result.ci_level:.0%} paired bootstrap CI, two-sided bootstrap p",
    ]
    for key in ("roc_auc", "sensitivity", "specificity"):
        d = getattr(result, key)
        lines.append(
            f"  {key:<12} A {d.a:.3f}  B {d.b:.3f}  difference {d.delta:+.3f} "
            f"[{d.low:+.3f}, {d.high:+.3f}]  p={d.p_value:.3f}"
        )
    return "\n".join(lines)
