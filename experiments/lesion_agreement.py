"""The lesion descriptors against the BrEaST radiologists' own (issue 22).

For every BrEaST image, two outlines are described by :mod:`busdx.lesion.descriptors`: the model's
(a mask-head model whose training, calibration and threshold never saw BrEaST, e.g. the BrEaST
fold of a leave-one-site-out CV) and the reader's mask from the release. Each descriptor is
compared with the clinical sheet's (``Shape``; ``Margin``: circumscribed or not;
``Posterior_features``): Cohen's kappa with a 95% bootstrap CI, and the confusion table. The
reader's mask isolates the descriptor rules from the segmentation: if the rule disagrees on the
reader's own outline, a better outline will not help. The sizes are compared in mm: the sheet's
``Pixel_size`` (cm, of the original image) scaled by how much the shared copy was shrunk
(``breast-original-sizes.csv``: each original's width and height, read from the PNG headers of
the release in nbayt/CSC-752-Project at commit 74034d1). The sheet has no orientation column,
so orientation is reported as counts only. Needs ``pip install openpyxl``.

    python experiments/lesion_agreement.py --run runs/loso3-lite0-mask/fold-2 \
        --data ../shared/data/breast_lesions_usg --sizes docs/lesions/breast-original-sizes.csv \
        --out docs/lesions/breast-agreement
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
from openpyxl import load_workbook
from PIL import Image

from busdx.data.datasets import attach_masks, scan_sites
from busdx.evaluation.segmentation import score_lesions, summarise_lesions, write_lesions
from busdx.inference.predictor import load_model
from busdx.stats.agreement import confusion_table, kappa_with_ci

SHEET = "BrEaST-Lesions-USG-clinical-data-Dec-15-2023.xlsx"
POSTERIOR = {"no": "none", "enhancement": "enhancement", "shadowing": "shadowing",
             "combined": "combined"}  # fmt: skip


def read_sheet(data: Path) -> dict[str, dict]:
    rows = load_workbook(data / SHEET, read_only=True).worksheets[0].iter_rows(values_only=True)
    header = next(rows)
    return {
        row[header.index("Image_filename")]: dict(zip(header, row, strict=True)) for row in rows
    }


def readers_descriptors(row: dict) -> dict[str, str | None]:
    margin = str(row["Margin"])
    return {
        "shape": row["Shape"] if row["Shape"] in {"oval", "round", "irregular"} else None,
        "margin": "circumscribed" if margin == "circumscribed"
        else "not circumscribed" if margin.startswith("not circumscribed") else None,
        "posterior": POSTERIOR.get(row["Posterior_features"]),
    }  # fmt: skip


def agreement(rated: list[str | None], readers: list[str | None], categories: list[str]) -> dict:
    pairs = [(a, b) for a, b in zip(rated, readers, strict=True) if a is not None and b]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    kappa, low, high = kappa_with_ci(a, b, n_resamples=2000)
    return {"n": len(pairs), "kappa": kappa, "kappa_ci": [low, high],
            "agreement": float(np.mean([x == y for x, y in pairs])), "categories": categories,
            "confusion_rows_readers_columns_rated": confusion_table(a, b, categories)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sizes", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for JSON and CSV")
    args = parser.parse_args()
    sheet = read_sheet(args.data)
    with args.sizes.open(newline="") as handle:
        originals = {r["image"]: int(r["original_width"]) for r in csv.DictReader(handle)}
    dataset = attach_masks(scan_sites([args.data], ["benign", "malignant"]))

    def spacing(sample) -> tuple[float, float]:
        millimetres = float(sheet[sample.path.name]["Pixel_size"]) * 10  # cm -> mm
        shrunk = originals[sample.path.name] / Image.open(sample.path).width
        return millimetres * shrunk, millimetres * shrunk

    scores = score_lesions(load_model(args.run, backend="torch"), dataset.samples, spacing=spacing)
    args.out.mkdir(parents=True, exist_ok=True)
    write_lesions(args.out / "lesions.csv", scores)
    names = [Path(s.relpath).name for s in scores]
    readers = [readers_descriptors(sheet[name]) for name in names]
    categories = {"shape": ["oval", "round", "irregular"],
                  "margin": ["circumscribed", "not circumscribed"],
                  "posterior": ["none", "enhancement", "shadowing", "combined"]}  # fmt: skip
    result = {"run": str(args.run), "segmentation": summarise_lesions(scores).model_dump()}
    for source in ("predicted", "truth"):
        lesions = [getattr(s, source) for s in scores]
        result[source] = {
            key: agreement([getattr(x, key) if x else None for x in lesions],
                           [r[key] for r in readers], values)
            for key, values in categories.items()
        }  # fmt: skip
        result[source]["orientation_counts"] = dict(Counter(x.orientation for x in lesions if x))
    both = [(s.predicted, s.truth) for s in scores if s.predicted and s.truth]
    for axis in ("long_axis", "short_axis"):
        model = np.array([getattr(p, axis) for p, _ in both])
        reader = np.array([getattr(t, axis) for _, t in both])
        result[f"{axis}_mm"] = {
            "n": len(both), "mean_abs_difference": float(np.abs(model - reader).mean()),
            "mean_difference": float((model - reader).mean()),
            "reader_mean": float(reader.mean()),
            "pearson_r": float(np.corrcoef(model, reader)[0, 1]),
        }  # fmt: skip
    (args.out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    for source in ("predicted", "truth"):
        for key in categories:
            row = result[source][key]
            print(f"{source:9} {key:9} n={row['n']:3} kappa {row['kappa']:+.3f} "
                  f"[{row['kappa_ci'][0]:+.3f}, {row['kappa_ci'][1]:+.3f}] "
                  f"agreement {row['agreement']:.1%}")  # fmt: skip
    seg = result["segmentation"]
    print(f"Dice {seg['dice']:.3f} [{seg['dice_ci'][0]:.3f}, {seg['dice_ci'][1]:.3f}]; long axis "
          f"|model - reader| {result['long_axis_mm']['mean_abs_difference']:.1f} mm")  # fmt: skip


if __name__ == "__main__":
    main()
