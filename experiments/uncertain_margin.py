"""Does the distance of a score from the threshold mark the images the model gets wrong?

For each held-out site of the leave-one-site-out study: temperature and threshold are fitted on
the other two sites' out-of-site logits (the cross-fitted threshold); the images whose
calibrated logit lies nearest the threshold are flagged, the band set so that 10% of the other
sites' images would be; the error rate (decision at the threshold against the truth) of the
flagged images is compared with that of the kept ones. Target of issue 27: at least 2x.

Usage:
    python experiments/uncertain_margin.py --out docs/scope/uncertain-margin.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.special import logit
from threshold_promise import read_sites

from busdx.calibration import fit_operating_points
from busdx.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", default="docs/multisite/lite0-oof-predictions.csv")
    parser.add_argument("--share", type=float, default=0.10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sites = read_sites(Path(args.predictions))
    settings = load_config(recipe="efficientnet-lite0").evaluate
    result = {"command": f"python experiments/uncertain_margin.py --out {args.out}", "sites": {}}
    for site, (labels, logits) in sites.items():
        others = [s for s in sites if s != site]
        y_ref = np.concatenate([sites[s][0] for s in others])
        x_ref = np.concatenate([sites[s][1] for s in others])
        fitted = fit_operating_points(x_ref, y_ref, settings)
        cut = logit(fitted["threshold"])
        band = np.quantile(np.abs(x_ref / fitted["temperature"] - cut), args.share)
        margin = np.abs(logits / fitted["temperature"] - cut)
        flagged = margin < band
        wrong = (logits / fitted["temperature"] >= cut) != labels.astype(bool)
        result["sites"][site] = {
            "flagged_share": float(flagged.mean()),
            "error_rate_flagged": float(wrong[flagged].mean()),
            "error_rate_kept": float(wrong[~flagged].mean()),
            "ratio": float(wrong[flagged].mean() / wrong[~flagged].mean()),
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
