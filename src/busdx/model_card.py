"""The run report (one self-contained HTML file) and the model card (markdown).

Rendering only: every number comes from files the run already wrote (``metrics.json``,
``run.json``, ``split.csv``, ``model.pt`` metadata); figures are embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from busdx.errors import CheckpointError
from busdx.fileio import atomic_write_text
from busdx.layout import (
    CONFUSION_MATRIX,
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
from busdx.metrics import DECISION_METRICS, SCORE_METRICS
from busdx.predictor import load_model
from busdx.runs import load_run

__all__ = ["write_report"]

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


def _value(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ci = (metrics.get("ci") or {}).get(key)
    interval = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci and ci.get("low") is not None else ""
    return f"{value:.3f}{interval}"


def _facts(run_dir: Path) -> dict[str, Any]:
    config, info = load_run(run_dir)
    paths = [run_dir / METRICS_FILE, *sorted(run_dir.glob("eval/*/metrics.json"))]
    evaluations = [json.loads(p.read_text(encoding="utf-8")) for p in paths if p.is_file()]
    if not evaluations:
        raise CheckpointError(
            f"{run_dir} has no metrics.json and no eval/*/metrics.json: finish training, or "
            "evaluate it first (busdx evaluate)"
        )
    metadata = load_model(run_dir).metadata
    with (run_dir / SPLIT_FILE).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    groups = Counter(r["group"] for r in rows if r.get("group"))
    return {"config": config, "info": info, "metrics": evaluations[0], "model": metadata,
            "evaluations": evaluations,
            "duplicate_groups": sum(1 for n in groups.values() if n > 1),
            "images_in_groups": sum(n for n in groups.values() if n > 1)}  # fmt: skip


def _head_text(model: Any) -> str:
    pool = {"flatten": "Flatten", "avg": "global average pooling",
            "avgmax": "global average + max pooling"}[model.pooling]  # fmt: skip
    if model.hidden_units == 0:
        return f"head {pool} → Dropout {model.dropout} → Linear 1"
    return f"head {pool} → Linear {model.hidden_units} + ReLU → Dropout {model.dropout} → Linear 1"


def _site_rows(evaluations: list[dict[str, Any]]) -> list[str]:
    """One row per evaluation: the run's own test split, then each external site."""
    lines = [
        "| site | split | n (malignant) | ROC AUC | sensitivity (promised) | specificity | ECE |"
        " out of scope | readers' AUC | model - readers AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in evaluations:
        readers = result.get("readers")
        reader_cells = ["—", "—"]
        if readers:
            delta = readers["delta_roc_auc"]
            reader_cells = [
                f"{readers['readers_roc_auc']:.3f}",
                f"{delta['delta']:+.3f} [{delta['low']:+.3f}, {delta['high']:+.3f}]",
            ]
        promise = result.get("promised_sensitivity")
        cells = [
            str(result.get("site", "")),
            result["split"],
            f"{result['n']} ({result['n_positive']})",
            _value(result, "roc_auc"),
            _value(result, "sensitivity") + (f" ({promise:.2f})" if promise else ""),
            _value(result, "specificity"),
            _value(result, "ece"),
            "—"
            if result.get("out_of_scope_rate") is None
            else f"{result['out_of_scope_rate']:.1%}",
            *reader_cells,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _model_card(facts: dict[str, Any]) -> str:
    config, info, metrics, model = facts["config"], facts["info"], facts["metrics"], facts["model"]
    calibrated = "temperature" in model
    backbone_state = "trained"
    if config.model.freeze_backbone:
        blocks = config.model.trainable_blocks
        backbone_state = f"frozen but its last {blocks} block(s)" if blocks else "frozen"
    size, prep = model["preprocessing"]["image_size"], model["preprocessing"]
    counts = "; ".join(f"{split}: {dict(row)}" for split, row in sorted(info["counts"].items()))
    lines = [
        f"# Model card: {config.recipe} (busdx {model['busdx_version']})",
        "",
        "## Intended use and limits",
        INTENDED_USE,
        "",
        "## Model",
        f"- Backbone `{config.model.name}` ({backbone_state}),"
        f" initial weights `{model['weights']['name']}` (sha256 `{model['weights']['sha256']}`);"
        f" {_head_text(config.model)}.",
        f"- Input {size}x{size} RGB; `(pixel_0_255 - {prep['mean']}) / {prep['std']}`.",
        f"- Classes {model['class_names']}; positive class `{model['positive_class']}`.",
        f"- Decision threshold {model['threshold']:.3f} ({model.get('threshold_policy', 'fixed')}"
        f", target sensitivity {model.get('target_sensitivity', '—')}); threshold and temperature"
        f" fitted on: {model.get('calibration_source', 'the validation split')}."
        + (
            f" Temperature scaling T = {model['temperature']:.3f}."
            if calibrated
            else " **Not calibrated**: probabilities are the raw sigmoid outputs."
        ),
        "",
        "## Data and split",
        f"- Data: {_data_sources(info)} ({info['layout']} layout); {counts}.",
        f"- Near-duplicate groups kept within one split: {facts['duplicate_groups']} groups holding"
        f" {facts['images_in_groups']} images (see `split.csv`, column `group`).",
        f"- Unreadable files left out: {len(info['skipped_files'])}.",
        "",
        f"## Performance on {metrics.get('site', 'the')} {metrics['split']} split"
        f" (n = {metrics['n']}, {metrics['n_positive']} {metrics['positive_class']})",
        "95% percentile-bootstrap confidence intervals in brackets.",
        "",
        "| metric | "
        + " | ".join(
            f"{name} (t={p['threshold']:.3f})" for name, p in metrics["operating_points"].items()
        )
        + " |",
        "|---|" + "---|" * len(metrics["operating_points"]),
    ]
    for key in ROWS:
        cells = [_value(point, key) for point in metrics["operating_points"].values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every evaluation, site by site",
        "The run's own test split first (when it has one), then each dataset evaluated with"
        " `busdx evaluate`"
        " (`eval/*/metrics.json`); sensitivity at the model's threshold, with the sensitivity that"
        " threshold was chosen to deliver in parentheses. Readers: the radiologists' BI-RADS on"
        " the same images, where the site records it (paired bootstrap CI).",
        "",
        *_site_rows(facts["evaluations"]),
    ]
    lines += ["", f"Training command: `{info['command']}`", ""]
    return "\n".join(lines)


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _markdown_to_html(markdown: str) -> str:
    """Just enough for the card: headings, bullets, paragraphs and one table."""
    out, table = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        text = html.escape(line).replace("**", "")
        if line.startswith("## "):
            out.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{text[2:]}</li>")
        elif line.strip():
            out.append(f"<p>{text}</p>")
    if table:
        out.append("<table>" + "".join(table) + "</table>")
    return "\n".join(out)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUNDIR/report.html`` and ``RUNDIR/MODEL_CARD.md``; return their paths."""
    run_dir = Path(run_dir)
    card = _model_card(_facts(run_dir))
    external = [
        (f"eval/{folder.name}/{name}", f"{title} ({folder.name})")
        for folder in sorted(p for p in (run_dir / "eval").glob("*") if p.is_dir())
        for name, title in ((ROC_CURVE, "ROC curve"), (RELIABILITY, "Calibration"))
    ]
    figures = "".join(
        f"<figure>{_embed(run_dir / name)}<figcaption>{html.escape(title)}</figcaption></figure>"
        for name, title in FIGURES + external
        if (run_dir / name).is_file()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>busdx report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;margin:8px;vertical-align:top}}img{{max-width:520px}}
.notice{{background:#fff3cd;border:1px solid #e0c36a;padding:8px}}</style></head><body>
<p class="notice">Research use only. Not a medical device.</p>
{_markdown_to_html(card)}<h2>Figures</h2>{figures}</body></html>"""
    card_path, report_path = run_dir / MODEL_CARD, run_dir / REPORT_HTML
    atomic_write_text(card_path, card)
    atomic_write_text(report_path, page)
    return report_path, card_path


def _data_sources(info: dict[str, Any]) -> str:
    sites = info.get("sites") or {}
    if len(sites) < 2:
        return f"`{info['data_root']}`"
    return f"{len(sites)} sites: " + ", ".join(f"{n} (`{root}`)" for n, root in sites.items())
