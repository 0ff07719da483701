"""Does a locally fitted threshold keep its promised sensitivity at a new hospital?

Each held-out site of the leave-one-site-out study plays the new hospital: its out-of-site
logits (``docs/multisite/lite0-oof-predictions.csv``: every image scored by a model that never
saw its site) are what the bundled recipe gives there. For each number of local labelled cases
and each of ``--draws`` random draws, the draw's cases refit temperature and threshold as
``busdx calibrate`` does, and the rest of the site measures the sensitivity and specificity
achieved. Rules compared:

- ``point``: the threshold whose observed sensitivity on the cases reaches the target
  (``--confidence 0``, busdx before 0.11);
- ``bound``: the one-sided Clopper-Pearson bound at ``--confidence`` must reach the target;
  where the cases cannot show that, every local malignant case is detected;
- ``bound+prior``: ``bound``, never less cautious than the cross-fitted threshold of the other
  sites (what the model ships with) where the cases cannot show the target (``busdx calibrate``).

For each rule: the share of draws whose achieved sensitivity reaches the target, the share
reaching the sensitivity ``busdx calibrate`` states as guaranteed at the confidence (is the
statement honest?), the median stated confidence, and the specificity.

Usage:
    python experiments/threshold_promise.py --draws 500 \
        --out docs/calibration/threshold-promise.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from busdx.config import load_config
from busdx.stats.calibration import (
    apply_temperature,
    fit_operating_points,
    sensitivity_promise,
    transfer_threshold,
)

RULES = ("point", "bound", "bound+prior")


def read_sites(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    sites = {}
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        sites[site] = (
            np.array([int(r["label"] == "malignant") for r in mine]),
            np.array([float(r["logit"]) for r in mine]),
        )
    return sites


def summary(values: list[float]) -> dict[str, float]:
    v = np.array(values, dtype=float)
    return {"median": float(np.median(v)), "p5": float(np.quantile(v, 0.05)),
            "p95": float(np.quantile(v, 0.95))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", default="docs/multisite/lite0-oof-predictions.csv")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    sites = read_sites(Path(args.predictions))
    base = load_config(recipe="efficientnet-lite0").evaluate
    settings = {
        rule: base.model_copy(
            update={
                "target_sensitivity": args.target,
                "threshold_confidence": 0.0 if rule == "point" else args.confidence,
            }
        )
        for rule in RULES
    }
    result = {"command": "python experiments/threshold_promise.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "predictions"),
        "target": args.target, "confidence": args.confidence, "draws": args.draws,
        "sites": {}}  # fmt: skip
    rng = np.random.default_rng(0)
    for site, (labels, logits) in sites.items():
        others = [s for s in sites if s != site]
        y_ref = np.concatenate([sites[s][0] for s in others])
        x_ref = np.concatenate([sites[s][1] for s in others])
        prior = fit_operating_points(x_ref, y_ref, settings["point"])  # the shipped threshold
        called = apply_temperature(logits, prior.temperature) >= prior.threshold
        entry = {
            "n": len(labels), "n_positive": int(labels.sum()),
            "cross_fitted": {
                "sensitivity": float(called[labels == 1].mean()),
                "specificity": float(1 - called[labels == 0].mean()),
                "kept": bool(called[labels == 1].mean() >= args.target),
            },
            "by_local_cases": {},
        }  # fmt: skip
        for size in args.sizes:
            draws = {rule: {"sens": [], "spec": [], "stated": [], "conf": []} for rule in RULES}
            skipped = 0
            for _ in range(args.draws):
                order = rng.permutation(len(labels))
                local, rest = order[:size], order[size:]
                if labels[local].sum() == 0 or labels[local].sum() == size:
                    skipped += 1
                    continue
                for rule in RULES:
                    fitted = fit_operating_points(logits[local], labels[local], settings[rule])
                    t, temp = fitted.threshold, fitted.temperature
                    local_p = apply_temperature(logits[local], temp)
                    promise = sensitivity_promise(labels[local], local_p, t, args.target,
                                                  args.confidence)  # fmt: skip
                    if rule == "bound+prior" and not promise.kept:
                        t = min(t, transfer_threshold(prior.threshold, prior.temperature,
                                                      temp))  # fmt: skip
                        promise = sensitivity_promise(labels[local], local_p, t, args.target,
                                                      args.confidence)  # fmt: skip
                    p = apply_temperature(logits[rest], temp)
                    hit = p >= t
                    draws[rule]["sens"].append(hit[labels[rest] == 1].mean())
                    draws[rule]["spec"].append(1 - hit[labels[rest] == 0].mean())
                    draws[rule]["stated"].append(promise.guaranteed)
                    draws[rule]["conf"].append(promise.confidence_of_target)
            entry["by_local_cases"][str(size)] = {"skipped_one_class_draws": skipped} | {
                rule: {
                    "share_reaching_target": float(np.mean(np.array(d["sens"]) >= args.target)),
                    "share_reaching_stated": float(
                        np.mean(np.array(d["sens"]) >= np.array(d["stated"]) - 1e-12)),
                    "stated_confidence_of_target": summary(d["conf"]),
                    "stated_guaranteed_sensitivity": summary(d["stated"]),
                    "sensitivity": summary(d["sens"]),
                    "specificity": summary(d["spec"]),
                }
                for rule, d in draws.items()
            }  # fmt: skip
        result["sites"][site] = entry
        print(site, json.dumps({k: {r: (v[r]["share_reaching_target"],
              round(v[r]["specificity"]["median"], 3)) for r in RULES}
              for k, v in entry["by_local_cases"].items()}))  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
