"""How many labelled local cases does a new hospital need to recalibrate a model?

Reads an external evaluation written by ``busdx evaluate`` (its ``predictions.csv`` holds each
image's raw logit), then, for each size n and each of ``--draws`` random draws, does what
``busdx calibrate`` does on n of the site's cases (temperature and the target-sensitivity
threshold refitted on them) and scores the rest of the site with it: achieved sensitivity,
specificity and ECE, summarised by their median and 5th-95th percentiles over the draws. ROC AUC
does not move (temperature and threshold never change the ranking), so it is reported once.

Usage:
    python experiments/local_calibration.py --eval runs/NAME/eval/breast_lesions_usg-all \\
        --sizes 20 50 100 --draws 200 --out docs/levers/local_calibration.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from busdx.calibration import apply_temperature, fit_operating_points
from busdx.config import load_config
from busdx.metrics import binary_metrics, roc_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="folder written by busdx evaluate")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.95, help="target sensitivity")
    parser.add_argument("--confidence", type=float, default=0.0, help="threshold_confidence")
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()

    folder = Path(args.eval)
    metrics = json.loads((folder / "metrics.json").read_text())
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"] == metrics["positive_class"]) for r in rows])
    logits = np.array([float(r["logit"]) for r in rows])
    settings = load_config().evaluate
    settings.target_sensitivity = args.target
    settings.threshold_confidence = args.confidence
    rng = np.random.default_rng(0)

    def score(probabilities, y, threshold):
        decided = binary_metrics(y, probabilities, threshold=threshold)
        return {k: decided[k] for k in ("sensitivity", "specificity", "ece")}

    before = score(apply_temperature(logits, metrics["temperature"]), labels, metrics["threshold"])
    results = {}
    for size in args.sizes:
        draws = []
        while len(draws) < args.draws:
            local = rng.permutation(len(labels))[:size]
            if labels[local].min() == labels[local].max():
                continue  # a draw needs both classes to fit anything
            rest = np.setdiff1d(np.arange(len(labels)), local)
            fitted = fit_operating_points(logits[local], labels[local], settings)
            probabilities = apply_temperature(logits[rest], fitted["temperature"])
            draws.append(score(probabilities, labels[rest], fitted["threshold"]))
        results[str(size)] = {
            key: {
                "median": float(np.median([d[key] for d in draws])),
                "p5": float(np.percentile([d[key] for d in draws], 5)),
                "p95": float(np.percentile([d[key] for d in draws], 95)),
                "mean": float(np.mean([d[key] for d in draws])),
            }
            for key in ("sensitivity", "specificity", "ece")
        }
        results[str(size)]["share_reaching_target"] = float(
            np.mean([d["sensitivity"] >= args.target for d in draws])
        )
        line = results[str(size)]
        print(
            f"n={size:>3}: sensitivity {line['sensitivity']['median']:.3f} "
            f"[{line['sensitivity']['p5']:.3f}, {line['sensitivity']['p95']:.3f}], specificity "
            f"{line['specificity']['median']:.3f}, ECE {line['ece']['median']:.3f}; target reached "
            f"in {line['share_reaching_target']:.0%} of draws"
        )
    payload = {
        "command": "python experiments/local_calibration.py --eval {} --sizes {} --draws {} "
        "--target {} --confidence {} --out {}".format(
            args.eval,
            " ".join(map(str, args.sizes)),
            args.draws,
            args.target,
            args.confidence,
            args.out,
        ),
        "site": metrics.get("site"),
        "n": len(labels),
        "n_positive": int(labels.sum()),
        "roc_auc": roc_auc(labels, logits),
        "without_local_calibration": before,
        "by_local_cases": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
