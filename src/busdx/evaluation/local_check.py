"""A new hospital's local validation: its figures beside what the model card expects.

A bundled model's ``bundled.json`` records its recipe's leave-one-site-out study: each
hospital scored by a model that never saw it, at the threshold cross-fitted on the others.
:func:`check_expectation` sets a local evaluation beside the range those hospitals spanned and
says, metric by metric, whether the local result is inside it, or below or above it beyond its
own confidence interval. :func:`write_validation_page` turns an evaluation folder into one HTML
page a hospital can file: ROC with the operating point, the confusion at the threshold,
calibration, the inputs flagged, per-scanner figures when the table names scanners.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path
from typing import Any

from busdx.bundled import SUMMARY_FILE, output_home
from busdx.errors import DataError
from busdx.fileio import atomic_write_text
from busdx.layout import (
    CONFUSION_MATRIX,
    EVAL_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RELIABILITY,
    ROC_CURVE,
    VALIDATION_HTML,
)
from busdx.results import Evaluation, ExpectedRange, LocalCheck, Metrics, OneClassGroup
from busdx.stats.calibration import Calibration
from busdx.templating import render

__all__ = [
    "EXPECTED_METRICS",
    "check_expectation",
    "describe_threshold",
    "expectation",
    "format_check",
    "local_evaluations",
    "write_validation_page",
]

EXPECTED_METRICS = ("roc_auc", "sensitivity", "specificity")


def local_evaluations(run_dir: Path) -> list[Path]:
    """The evaluation folders written for a run by ``busdx evaluate`` (for a bundled model,
    under ``busdx-output/NAME/eval``)."""
    found = (output_home(run_dir) / EVAL_DIR).glob(f"*/{METRICS_FILE}")
    return sorted(path.parent for path in found)


def expectation(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The held-out hospitals of a model's leave-one-site-out study (``bundled.json``), or
    None for a model that records none."""
    summary = Path(run_dir) / SUMMARY_FILE
    if not summary.is_file():
        return None
    return json.loads(summary.read_text(encoding="utf-8")).get("held_out_sites") or None


def _verdict(local: Metrics, metric: str, low: float, high: float) -> str:
    ci = local.ci.get(metric)
    lower, upper = (ci.low, ci.high) if ci else (getattr(local, metric),) * 2
    if upper < low:
        return "below"
    if lower > high:
        return "above"
    return "inside"


def check_expectation(result: Metrics, sites: dict[str, dict[str, Any]]) -> LocalCheck:
    """Each of :data:`EXPECTED_METRICS` of ``result`` beside the range of ``sites``."""
    rows = []
    for metric in EXPECTED_METRICS:
        values = [site[metric] for site in sites.values() if metric in site]
        local = getattr(result, metric)
        if not values or math.isnan(local):
            continue
        low, high = min(values), max(values)
        rows.append(ExpectedRange(metric=metric, local=local, local_ci=result.ci.get(metric),
                                  low=low, high=high,
                                  verdict=_verdict(result, metric, low, high)))  # fmt: skip
    return LocalCheck(
        source="the model card's leave-one-site-out study: each hospital scored by a model "
        "that never saw it, at the threshold cross-fitted on the others",
        sites=sorted(sites),
        rows=rows,
    )


def format_check(check: LocalCheck) -> list[str]:
    """The check as terminal lines."""
    lines = [f"  against the model card ({len(check.sites)} hospitals it never saw: "
             f"{', '.join(check.sites)}):"]  # fmt: skip
    for row in check.rows:
        ci = f" [{row.local_ci.low:.3f}, {row.local_ci.high:.3f}]" if row.local_ci else ""
        lines.append(f"    {row.metric:<12} here {row.local:.3f}{ci}; expected "
                     f"{row.low:.3f} to {row.high:.3f}: {row.verdict}")  # fmt: skip
    if any(row.verdict == "below" for row in check.rows):
        lines.append("    below the range beyond the noise: the model does worse here than at "
                     "any hospital of the study; do not rely on it here")  # fmt: skip
    return lines


def _figure(folder: Path, name: str, title: str) -> dict[str, str] | None:
    path = folder / name
    if not path.is_file():
        return None
    return {"title": title, "png_base64": base64.b64encode(path.read_bytes()).decode("ascii")}


def _cell(metrics: Metrics, key: str) -> str:
    value, ci = getattr(metrics, key), metrics.ci.get(key)
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" + (f" [{ci.low:.3f}, {ci.high:.3f}]" if ci else "")


def _flagged(folder: Path) -> list[dict[str, str]]:
    """The images flagged as not a scan (``predictions.csv``)."""
    with (folder / PREDICTIONS_FILE).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{"path": r["path"], "label": r["label"], "flag": "not a scan"}
            for r in rows if r.get("out_of_scope") == "True"]  # fmt: skip


def write_validation_page(folder: str | Path, out: str | Path | None = None) -> Path:
    """``busdx report EVAL_DIR``: one self-contained HTML page of a local evaluation (written
    by ``busdx evaluate``); default ``EVAL_DIR/validation.html``."""
    folder = Path(folder)
    if not (folder / METRICS_FILE).is_file():
        raise DataError(f"{folder} holds no {METRICS_FILE}: evaluate first (busdx evaluate)")
    result = Evaluation.read(folder / METRICS_FILE)
    keys = ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "ece")
    groups = [
        (kind, name, row)
        for kind, table in (("site", result.per_site), ("scanner", result.per_scanner))
        for name, row in (table or {}).items()
    ]
    context = {
        "result": result,
        "headline": [(key, _cell(result, key)) for key in keys],
        "groups": [
            {
                "kind": kind,
                "name": name,
                "n": row.n,
                "n_positive": row.n_positive,
                "cells": (
                    ["one class only"] * 3
                    if isinstance(row, OneClassGroup)
                    else [_cell(row, k) for k in ("roc_auc", "sensitivity", "specificity")]
                ),
            }
            for kind, name, row in groups
        ],
        "expected": result.expected,
        "flagged": _flagged(folder),
        "figures": [
            f
            for f in (
                _figure(folder, ROC_CURVE, "ROC curve with the operating points"),
                _figure(folder, CONFUSION_MATRIX, "Confusion at the model's threshold"),
                _figure(folder, RELIABILITY, "Calibration"),
            )
            if f
        ],
    }
    path = Path(out) if out else folder / VALIDATION_HTML
    atomic_write_text(path, render("validation.html.j2", **context))
    return path


def describe_threshold(
    calibration: Calibration | None, held_out: dict[str, dict[str, Any]] | None
) -> str:
    """How a model's threshold was chosen (its :class:`~busdx.inference.model_file.Calibration`) and
    what to expect of it, in one sentence: the API's ``threshold_basis``, the page footer,
    ``busdx models``."""
    if calibration is None:
        return "fixed threshold, not calibrated"
    policy, source = calibration.threshold_policy, calibration.source
    target = calibration.promised_sensitivity
    if target is None:
        return f"{policy} threshold, chosen on {source}"
    text = f"chosen for sensitivity {target:.2f} on {source}"
    promise = calibration.sensitivity_promise
    if promise and promise.confidence > 0:  # at 0 it is the observed sensitivity alone
        text += (f"; these cases show sensitivity >= {promise.guaranteed:.3f} with "
                 f"{promise.confidence:.0%} confidence")  # fmt: skip
    if held_out:
        kept = [row["sensitivity"] for row in held_out.values()]
        text += (f"; at hospitals its recipe never saw it kept {target:.2f} at "
                 f"{sum(s >= target for s in kept)} of {len(kept)} (sensitivity "
                 f"{', '.join(f'{s:.3f}' for s in kept)})")  # fmt: skip
    return text
