"""Does cropping to the content ever cut a lesion away? The B-mode field detector, measured.

For every image of BUSI and BrEaST (benign + malignant, each with its lesion mask), the crop
of ``data.crop: content`` (:func:`busdx.data.preprocess.content_box`: the largest *textured* region)
is compared with the lesion's box from its mask, beside the brightness-only rule busdx used
before (rows and columns at least 30% brighter than grey level 12, longest run, no gap
closing). Reported per site and rule: images cropped at all, mean share of the image kept,
images whose crop cuts away more than 5% of the lesion box, and the largest share cut.

Usage:
    python experiments/content_crop.py --data ../shared/data/busi \\
        --data ../shared/data/breast_lesions_usg --out docs/levers/content-crop.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from busdx.data.datasets import attach_boxes, scan_sites
from busdx.data.imaging import load_image
from busdx.data.preprocess import content_box


def brightness_box(image, *, dark: int = 12, min_fill: float = 0.3) -> tuple:
    """The previous rule: brightness only, the longest run of filled rows and columns."""
    grey = np.asarray(image.convert("L"), dtype=np.uint8) > dark
    spans = []
    for axis in (0, 1):
        filled = np.concatenate([grey.mean(axis=axis) >= min_fill, [False]])
        best, start = (0, 0), None
        for index, value in enumerate(filled):
            if value and start is None:
                start = index
            elif not value and start is not None:
                best = max(best, (start, index), key=lambda run: run[1] - run[0])
                start = None
        spans.append(best if best[1] > best[0] else (0, len(filled) - 1))
    (left, right), (top, bottom) = spans
    if (right - left) * (bottom - top) < 0.25 * grey.size:
        return (0, 0, image.width, image.height)
    return (left, top, right, bottom)


def lesion_cut(crop: tuple, box: tuple) -> float:
    """Share of the lesion box ``(x, y, w, h)`` outside ``crop`` (left, top, right, bottom)."""
    x, y, w, h = box
    left, top, right, bottom = crop
    inside_x = max(0, min(x + w, right) - max(x, left))
    inside_y = max(0, min(y + h, bottom) - max(y, top))
    return 1 - inside_x * inside_y / (w * h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a site (class folders)")
    parser.add_argument("--out", required=True, help="JSON results")
    args = parser.parse_args()
    rules = {"textured (busdx now)": content_box, "brightness only (before)": brightness_box}
    results = {}
    for source in args.data:
        dataset = attach_boxes(scan_sites([source], ["benign", "malignant"]))
        rows = {name: [] for name in rules}
        for sample in tqdm(dataset.samples, desc=dataset.site, unit="img"):
            image = load_image(sample.path)
            for name, rule in rules.items():
                crop = rule(image)
                kept = (crop[2] - crop[0]) * (crop[3] - crop[1]) / (image.width * image.height)
                rows[name].append((kept, lesion_cut(crop, sample.box)))
        results[dataset.site] = {
            name: {
                "images": len(values),
                "cropped": int(sum(kept < 1 for kept, _ in values)),
                "mean_share_kept": round(float(np.mean([kept for kept, _ in values])), 4),
                "lesion_cut_over_5pct": int(sum(cut > 0.05 for _, cut in values)),
                "largest_lesion_share_cut": round(float(max(cut for _, cut in values)), 4),
            }
            for name, values in rows.items()
        }
    command = "python experiments/content_crop.py " + " ".join(f"--data {d}" for d in args.data)
    payload = {"command": f"{command} --out {args.out}", "sites": results}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
