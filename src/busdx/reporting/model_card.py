"""The run report (one self-contained HTML file) and the model card (markdown).

Rendering only: every number comes from files the run already wrote (``metrics.json``,
``run.json``, ``split.csv``, ``model.pt`` metadata); figures are embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

from busdx.errors import CheckpointError
from busdx.fileio import atomic_write_text
from busdx.inference.model_file import ModelInfo
from busdx.inference.predictor import load_model
from busdx.layout import (
    CONFUSION_MATRIX,
    EVAL_DIR,
    GRADCAM_SAMPLES,
    METRICS_FILE,
    MODEL_CARD,
    RELIABILITY,
    REPORT_HTML,
    ROC_CURVE,
    SAMPLE_PREDICTIONS,
    SPLIT_FILE,
    TRAINING_CURVES,
)
from busdx.results import Evaluation, Metrics
from busdx.runs import load_run
from busdx.stats.metrics import DECISION_METRICS, SCORE_METRICS
from busdx.templating import render

__all__ = ["card_context", "write_report"]

INTENDED_USE = (
    "Research and education: a baseline for telling benign from malignant breast lesions in "
    "B-mode ultrasound images. Not a medical device; not for diagnosis, triage or any clinical "
    "decision. Expect lower performance on other hospitals, scanners and populations than on "
    "the held-out split of the training data, and on images with Doppler, elastography or "
    "burned-in annotations."
)
FIGURES = [
    (TRAINING_CURVES, "Training curves"),
    (ROC_CURVE, "ROC curve (test)"),
    (RELIABILITY, "Calibration (test)"),
    (CONFUSION_MATRIX, "Confusion matrix (test, model's threshold)"),
    (SAMPLE_PREDICTIONS, "Sample predictions (errors in red)"),
    (GRADCAM_SAMPLES, "Grad-CAM of the same images: where the model found its evidence"),
]
ROWS = SCORE_METRICS[:2] + DECISION_METRICS + SCORE_METRICS[2:]


def _value(metrics: Metrics, key: str) -> str:
    value = getattr(metrics, key)
    if math.isnan(value):
        return "n/a"
    ci = metrics.ci.get(key)
    interval = f" [{ci.low:.3f}, {ci.high:.3f}]" if ci and not math.isnan(ci.low) else ""
    return f"{value:.3f}{interval}"


def _facts(run_dir: Path) -> dict[str, Any]:
    config, info = load_run(run_dir)
    paths = [run_dir / METRICS_FILE, *sorted(run_dir.glob(f"{EVAL_DIR}/*/{METRICS_FILE}"))]
    evaluations = [Evaluation.read(p) for p in paths if p.is_file()]
    if not evaluations:
        raise CheckpointError(
            f"{run_dir} has no metrics.json and no eval/*/metrics.json: finish training, or "
            "evaluate it first (busdx evaluate)"
        )
    model = load_model(run_dir).info
    with (run_dir / SPLIT_FILE).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    groups = Counter(r["group"] for r in rows if r.get("group"))
    return {"config": config, "info": info, "metrics": evaluations[0], "model": model,
            "evaluations": evaluations,
            "duplicate_groups": sum(1 for n in groups.values() if n > 1),
            "images_in_groups": sum(n for n in groups.values() if n > 1)}  # fmt: skip


POOLING_NAMES = {
    "flatten": "Flatten",
    "avg": "global average pooling",
    "avgmax": "global average + max pooling",
    "multistage": "global average pooling of the last stages, concatenated",
}


def _head_text(model: Any) -> str:
    pool = POOLING_NAMES[model.pooling]
    if model.hidden_units == 0:
        return f"head {pool} → Dropout {model.dropout} → Linear 1"
    return f"head {pool} → Linear {model.hidden_units} + ReLU → Dropout {model.dropout} → Linear 1"


SITE_COLUMNS = (
    "site", "split", "n (malignant)", "ROC AUC", "sensitivity (promised)", "specificity", "ECE",
    "out of scope", "readers' AUC", "model - readers AUC", "outline Dice",
)  # fmt: skip


def _dice(result: Evaluation) -> str:
    """The mask head's outlines against the readers' masks (— for a model without one)."""
    seg = result.segmentation
    return "—" if seg is None else f"{seg.dice:.3f} [{seg.dice_ci[0]:.3f}, {seg.dice_ci[1]:.3f}]"


def _site_table(evaluations: list[Evaluation]) -> dict[str, Any]:
    """One row per evaluation: the run's own test split, then each external site."""
    rows = []
    for result in evaluations:
        readers = result.readers
        reader_cells = ["—", "—"]
        if readers:
            delta = readers.delta_roc_auc
            reader_cells = [
                f"{readers.readers_roc_auc:.3f}",
                f"{delta.delta:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]",
            ]
        promise = result.promised_sensitivity
        scope = result.out_of_scope_rate
        rows.append([
            result.site, result.split, f"{result.n} ({result.n_positive})",
            _value(result, "roc_auc"),
            _value(result, "sensitivity") + (f" ({promise:.2f})" if promise else ""),
            _value(result, "specificity"), _value(result, "ece"),
            "—" if scope is None else f"{scope:.1%}", *reader_cells, _dice(result),
        ])  # fmt: skip
    return {
        "heading": "Every evaluation, site by site",
        "note": "The run's own test split first (when it has one), then each dataset evaluated "
        "with busdx evaluate (eval/*/metrics.json); sensitivity at the model's threshold, with "
        "the sensitivity that threshold was chosen to deliver in parentheses. Readers: the "
        "radiologists' BI-RADS on the same images, where the site records it (paired bootstrap "
        "CI). Outline Dice: a mask-head model's outlines against the readers' masks.",
        "header": SITE_COLUMNS,
        "rows": rows,
    }


def _model_lines(config: Any, model: ModelInfo) -> list[str]:
    backbone_state = "trained"
    if config.model.freeze_backbone:
        blocks = config.model.trainable_blocks
        backbone_state = f"frozen but its last {blocks} block(s)" if blocks else "frozen"
    prep, weights, calibration = model.preprocessing, model.provenance.weights, model.calibration
    if calibration is None:
        decision = (f"Decision threshold {model.threshold:.3f} (fixed). NOT CALIBRATED: "
                    "probabilities are the raw sigmoid outputs.")  # fmt: skip
    else:
        decision = (
            f"Decision threshold {model.threshold:.3f} ({calibration.threshold_policy}, target "
            f"sensitivity {calibration.target_sensitivity or '—'}); threshold and temperature "
            f"fitted on: {calibration.source}. Temperature scaling T = "
            f"{calibration.temperature:.3f}."
        )
    return [
        f"Backbone `{config.model.name}` ({backbone_state}), initial weights "
        f"`{weights.get('name')}` (sha256 `{weights.get('sha256')}`); "
        f"{_head_text(config.model)}.",
        f"Input {prep.image_size}x{prep.image_size} RGB; "
        f"`(pixel_0_255 - {list(prep.mean)}) / {list(prep.std)}`.",
        f"Classes {list(model.class_names)}; positive class `{model.positive_class}`.",
        decision,
    ]


def _performance_table(metrics: Evaluation) -> dict[str, Any]:
    points = metrics.operating_points
    return {
        "heading": f"Performance on {metrics.site or 'the'} {metrics.split} split "
        f"(n = {metrics.n}, {metrics.n_positive} {metrics.positive_class})",
        "note": f"{metrics.ci_level:.0%} percentile-bootstrap confidence intervals in brackets.",
        "header": ["metric", *(f"{name} (t={p.threshold:.3f})" for name, p in points.items())],
        "rows": [[key, *(_value(p, key) for p in points.values())] for key in ROWS],
    }


def card_context(facts: dict[str, Any]) -> dict[str, Any]:
    """What the model card and the report show, from the run's own files (:func:`_facts`)."""
    config, info, metrics, model = facts["config"], facts["info"], facts["metrics"], facts["model"]
    counts = "; ".join(f"{split}: {dict(row)}" for split, row in sorted(info["counts"].items()))
    return {
        "title": f"{config.recipe} (busdx {model.provenance.busdx_version})",
        "intended_use": INTENDED_USE,
        "model_lines": _model_lines(config, model),
        "data_lines": [
            f"Data: {_data_sources(info)} ({info['layout']} layout); {counts}.",
            f"Near-duplicate groups kept within one split: {facts['duplicate_groups']} groups "
            f"holding {facts['images_in_groups']} images (see `split.csv`, column `group`).",
            f"Unreadable files left out: {len(info['skipped_files'])}.",
        ],
        "performance": _performance_table(metrics),
        "sites": _site_table(facts["evaluations"]),
        "command": info["command"],
    }


def _figures(run_dir: Path) -> list[dict[str, str]]:
    external = [
        (f"{EVAL_DIR}/{folder.name}/{name}", f"{title} ({folder.name})")
        for folder in sorted(p for p in (run_dir / EVAL_DIR).glob("*") if p.is_dir())
        for name, title in ((ROC_CURVE, "ROC curve"), (RELIABILITY, "Calibration"))
    ]
    return [
        {"title": title,
         "png_base64": base64.b64encode((run_dir / name).read_bytes()).decode("ascii")}
        for name, title in FIGURES + external
        if (run_dir / name).is_file()
    ]  # fmt: skip


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUNDIR/report.html`` and ``RUNDIR/MODEL_CARD.md``; return their paths."""
    run_dir = Path(run_dir)
    context = card_context(_facts(run_dir))
    card_path, report_path = run_dir / MODEL_CARD, run_dir / REPORT_HTML
    atomic_write_text(card_path, render("model_card.md.j2", **context))
    atomic_write_text(report_path, render("report.html.j2", **context, figures=_figures(run_dir)))
    return report_path, card_path


def _data_sources(info: dict[str, Any]) -> str:
    sites = info.get("sites") or {}
    if len(sites) < 2:
        return f"`{info['data_root']}`"
    return f"{len(sites)} sites: " + ", ".join(f"{n} (`{root}`)" for n, root in sites.items())
