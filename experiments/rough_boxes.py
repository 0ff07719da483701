"""Rough lesion boxes, as a reader dragging a box by hand might draw them.

Each image's box from its lesion mask has each edge moved by a uniform random share of the
box's side in [-spread, +spread] (seeded), then clipped to the image; written as a boxes CSV
(``path,box``) for ``busdx evaluate --boxes``, to measure how an ROI model's ranking depends
on how exactly the box is drawn.

Usage:
    python experiments/rough_boxes.py --data ../shared/data/breast_lesions_usg --spread 0.15 \\
        --out docs/levers/breast-rough-boxes-15.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from busdx.data.boxes import box_to_text
from busdx.data.datasets import attach_boxes, scan_sites
from busdx.data.imaging import load_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a site with lesion masks")
    parser.add_argument("--spread", type=float, default=0.15, help="edge move, share of side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="boxes CSV")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    dataset = attach_boxes(scan_sites([args.data], ["benign", "malignant"]))
    with Path(args.out).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "box"])
        for sample in dataset.samples:
            width, height = load_image(sample.path).size
            x, y, w, h = sample.box
            moves = rng.uniform(-args.spread, args.spread, 4) * np.array([w, h, w, h])
            left, top = max(0, round(x + moves[0])), max(0, round(y + moves[1]))
            right = min(width, max(left + 1, round(x + w + moves[2])))
            bottom = min(height, max(top + 1, round(y + h + moves[3])))
            writer.writerow([sample.relpath, box_to_text((left, top, right - left, bottom - top))])


if __name__ == "__main__":
    main()
