"""Promised vs achieved sensitivity of the cross-fitted threshold, by confidence level.

From a finished ``busdx cv`` folder (its fold predictions hold each image's raw out-of-fold
logit) and, optionally, an external evaluation of its cross-fitted ensemble, for each
``evaluate.threshold_confidence``:

* BUSI, honestly: each fold decided by the temperature and threshold fitted on the other folds'
  out-of-fold predictions (``busdx.workflows.pipeline.leave_one_fold_out_threshold``);
* the external site: the ensemble's logits decided by the temperature and threshold fitted on
  all out-of-fold predictions (what ``OUT/ensemble`` stores for that confidence); the site is
  never used to fit anything.

Usage:
    python experiments/crossfit_threshold.py --cv runs/cv-busi-lite0 \\
        --external runs/cv-busi-lite0/ensemble/eval/breast_lesions_usg-all \\
        --out docs/levers/crossfit-threshold.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from busdx.config import apply_overrides, load_config
from busdx.stats.calibration import apply_temperature, fit_operating_points
from busdx.stats.metrics import binary_metrics, bootstrap_ci
from busdx.workflows.crossfit import leave_one_fold_out_threshold


def _predictions(folder: Path, positive: str) -> tuple[np.ndarray, np.ndarray]:
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"] == positive) for r in rows])
    return labels, np.array([float(r["logit"]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="a busdx cv output folder")
    parser.add_argument("--external", help="busdx evaluate folder of its ensemble on a site")
    parser.add_argument("--confidences", type=float, nargs="+", default=[0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cv = Path(args.cv)
    config = load_config(cv / "config.yaml")
    positive = config.data.positive_class
    labels, logits, fold_of = [], [], []
    for fold_dir in sorted(cv.glob("fold-*")):
        y, z = _predictions(fold_dir, positive)
        labels.append(y)
        logits.append(z)
        fold_of.append(np.full(len(y), int(fold_dir.name.split("-")[1])))
    y_cv, z_cv, folds = map(np.concatenate, (labels, logits, fold_of))
    external = _predictions(Path(args.external), positive) if args.external else None
    rows = []
    for confidence in args.confidences:
        overrides = [
            f"evaluate.target_sensitivity={args.target}",
            f"evaluate.threshold_confidence={confidence}",
        ]
        settings = apply_overrides(config, overrides)
        busi, _ = leave_one_fold_out_threshold(settings, y_cv, z_cv, folds)
        row = {
            "confidence": confidence,
            "busi_lofo": {k: busi[k] for k in ("sensitivity", "specificity")},
            "busi_lofo_ci": {k: busi["ci"][k] for k in ("sensitivity", "specificity")},
        }
        if external is not None:
            fitted = fit_operating_points(z_cv, y_cv, settings.evaluate)
            y_site, z_site = external
            probabilities = apply_temperature(z_site, fitted.temperature)
            decided = binary_metrics(y_site, probabilities, threshold=fitted.threshold)
            ci = bootstrap_ci(y_site, probabilities, threshold=fitted.threshold)
            row["threshold"] = fitted.threshold
            row["external"] = {k: decided[k] for k in ("sensitivity", "specificity")}
            row["external_ci"] = {k: ci[k] for k in ("sensitivity", "specificity")}
        rows.append(row)
        text = (
            f"confidence {confidence:.2f}: BUSI sensitivity {busi['sensitivity']:.3f}, "
            f"specificity {busi['specificity']:.3f}"
        )
        if external is not None:
            text += (
                f" | external sensitivity {row['external']['sensitivity']:.3f}, specificity "
                f"{row['external']['specificity']:.3f}"
            )
        print(text)
    payload = {
        "command": f"python experiments/crossfit_threshold.py --cv {args.cv} --external "
        f"{args.external} --target {args.target} --out {args.out}",
        "target_sensitivity": args.target,
        "n_busi": len(y_cv),
        "n_busi_positive": int(y_cv.sum()),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
