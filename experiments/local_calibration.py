"""How many labelled local cases does a new hospital need to recalibrate a model?

Reads an external evaluation written by ``busdx evaluate`` (its ``predictions.csv`` holds each
image's raw logit), then, for each size n and each of ``--draws`` random draws, does what
``busdx calibrate`` does on n of the site's cases (temperature and the target-sensitivity
threshold refitted on them) and scores the rest of the site with it: achieved sensitivity,
specificity and ECE, summarised by their median and 5th-95th percentiles over the draws. ROC AUC
does not move (temperature and threshold never change the ranking), so it is reported once.

With ``--refit-head`` (which needs ``--run`` and ``--data`` instead of ``--eval``) each draw
does what ``busdx calibrate --refit-head`` does: the head's last layer is refitted on the n
cases (anchored, strength by CV over them) and the threshold comes from their out-of-fold
logits; the ROC AUC of the rest of the site is then reported per draw too.

Usage:
    python experiments/local_calibration.py --eval runs/NAME/eval/breast_lesions_usg-all \\
        --sizes 20 50 100 --draws 200 --out docs/levers/local_calibration.json
    python experiments/local_calibration.py --run runs/NAME --data ../shared/data/SITE \\
        --refit-head --sizes 20 50 100 --draws 50 --out docs/levers/local_refit.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from busdx.config import load_config
from busdx.data.datasets import scan_dataset
from busdx.inference.predictor import load_model
from busdx.stats.calibration import apply_temperature, fit_operating_points
from busdx.stats.metrics import binary_metrics, roc_auc
from busdx.workflows.head_refit import fit_local_head, last_layer_features


def site_scores(args: argparse.Namespace):
    """Labels, raw logits, the model's own temperature/threshold, and (for --run) features."""
    if args.eval:
        folder = Path(args.eval)
        metrics = json.loads((folder / "metrics.json").read_text())
        with (folder / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        labels = np.array([int(r["label"] == metrics["positive_class"]) for r in rows])
        logits = np.array([float(r["logit"]) for r in rows])
        return metrics.get("site"), labels, logits, metrics, None
    loaded = load_model(args.run)
    samples = scan_dataset(args.data, loaded.class_names).samples
    features, heads = last_layer_features(loaded, [s.path for s in samples])
    logits = np.mean([x @ w + b for x, (w, b) in zip(features, heads, strict=True)], axis=0)
    own = {"temperature": loaded.temperature, "threshold": loaded.threshold}
    labels = np.array([s.label for s in samples])
    return Path(args.data).name, labels, logits, own, (features, heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", help="folder written by busdx evaluate")
    parser.add_argument("--run", help="run directory (with --data, instead of --eval)")
    parser.add_argument("--data", help="the site's labelled images (with --run)")
    parser.add_argument("--refit-head", action="store_true", help="refit the last layer too")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.95, help="target sensitivity")
    parser.add_argument("--confidence", type=float, default=0.0, help="threshold_confidence")
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()
    if bool(args.eval) == bool(args.run and args.data) or (args.refit_head and not args.run):
        parser.error("give --eval, or --run and --data (needed for --refit-head)")

    site, labels, logits, metrics, layers = site_scores(args)
    settings = load_config().evaluate
    settings.target_sensitivity = args.target
    settings.threshold_confidence = args.confidence
    rng = np.random.default_rng(0)

    def score(probabilities, y, threshold):
        decided = binary_metrics(y, probabilities, threshold=threshold)
        return {k: decided[k] for k in ("sensitivity", "specificity", "ece", "roc_auc")}

    def calibrate(local: np.ndarray, rest: np.ndarray):
        """What busdx calibrate [--refit-head] does on the local cases: the rest's logits,
        the temperature and the threshold (and the refit record)."""
        if not args.refit_head:
            fitted = fit_operating_points(logits[local], labels[local], settings)
            return logits[rest], fitted
        features, heads = layers
        local_features = [x[local] for x in features]
        fitted, refitted = fit_local_head(local_features, heads, labels[local], settings)
        rest_logits = np.mean(
            [x[rest] @ w + b for x, (w, b) in zip(features, refitted, strict=True)], axis=0
        )
        return rest_logits, fitted

    before = score(apply_temperature(logits, metrics["temperature"]), labels, metrics["threshold"])
    keys = ("sensitivity", "specificity", "ece", "roc_auc")
    need = 2 if args.refit_head else 1
    results = {}
    for size in args.sizes:
        draws, kept = [], []
        bar = tqdm(total=args.draws, desc=f"{size} local cases", leave=False)
        while len(draws) < args.draws:
            local = rng.permutation(len(labels))[:size]
            if min(labels[local].sum(), size - labels[local].sum()) < need:
                continue  # a draw needs both classes (two of each for the head's CV)
            rest = np.setdiff1d(np.arange(len(labels)), local)
            rest_logits, fitted = calibrate(local, rest)
            probabilities = apply_temperature(rest_logits, fitted.temperature)
            draws.append(score(probabilities, labels[rest], fitted.threshold))
            kept.append(fitted.get("head_refit", {}).get("kept_trained_head", True))
            bar.update()
        bar.close()
        results[str(size)] = {
            key: {
                "median": float(np.median([d[key] for d in draws])),
                "p5": float(np.percentile([d[key] for d in draws], 5)),
                "p95": float(np.percentile([d[key] for d in draws], 95)),
                "mean": float(np.mean([d[key] for d in draws])),
            }
            for key in keys
        }
        results[str(size)]["share_reaching_target"] = float(
            np.mean([d["sensitivity"] >= args.target for d in draws])
        )
        results[str(size)]["share_keeping_the_trained_head"] = float(np.mean(kept))
        line = results[str(size)]
        print(
            f"n={size:>3}: sensitivity {line['sensitivity']['median']:.3f} "
            f"[{line['sensitivity']['p5']:.3f}, {line['sensitivity']['p95']:.3f}], specificity "
            f"{line['specificity']['median']:.3f}, ECE {line['ece']['median']:.3f}, AUC of the "
            f"rest {line['roc_auc']['median']:.3f}; target reached in "
            f"{line['share_reaching_target']:.0%} of draws"
        )
    payload = {
        "command": "python experiments/local_calibration.py {} --sizes {} --draws {} "
        "--target {} --confidence {} --out {}".format(
            f"--eval {args.eval}"
            if args.eval
            else f"--run {args.run} --data {args.data}" + " --refit-head" * args.refit_head,
            " ".join(map(str, args.sizes)),
            args.draws,
            args.target,
            args.confidence,
            args.out,
        ),
        "site": site,
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
