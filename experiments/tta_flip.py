"""Horizontal-flip test-time augmentation, measured under leave-one-site-out.

Reads the per-image held-out scores written by ``experiments/heldout_signals.py score`` (each
image's logit and the logit of its mirror image, from the fold model that never saw its
hospital) and compares, per site, the mean of the two logits against the logit alone: paired
bootstrap ΔAUC (2,000 resamples).

Usage:
    python experiments/tta_flip.py --scores docs/adaptation --out docs/levers/tta-flip-loso.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from busdx.stats.metrics import paired_bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"command": f"python experiments/tta_flip.py --scores {args.scores} --out {args.out}",
              "sites": {}}  # fmt: skip
    for path in sorted(Path(args.scores).glob("heldout-*.csv")):
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        labels = np.array([int(r["label"] == "malignant") for r in rows])
        plain = np.array([float(r["logit"]) for r in rows])
        flipped = np.array([float(r["logit_flip"]) for r in rows])
        delta = paired_bootstrap(labels, (plain + flipped) / 2, plain, n_resamples=2000, seed=0)
        result["sites"][rows[0]["site"]] = {"n": len(rows), "delta_roc_auc": delta}
        print(rows[0]["site"], {k: round(v, 3) for k, v in delta.items() if isinstance(v, float)})
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
