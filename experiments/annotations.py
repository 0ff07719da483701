"""How much of a model's score do burned-in annotations (calipers, text, markers) carry?

Three measurements, with ``busdx.training.transforms.annotation_mask`` as the detector:

1. Marks as a shortcut: the share of each image's pixels the detector marks, per site and class,
   and the ROC AUC of that share alone as a malignancy score (0.5: the marks say nothing about
   the label; far from 0.5: a model could learn the label from the marks).
2. Reliance on marks inside BUSI: each fold model of a ``busdx cv`` folder scores its own test
   fold twice, as is and with the marks painted over (``data.annotations: mask`` at test time
   only); pooled ROC AUC of both, paired bootstrap difference.
3. The same for a run (e.g. the cross-fitted ensemble) on an external site.

It also draws a figure of the detector on generated scans with drawn annotations.

Usage:
    python experiments/annotations.py --data ../shared/data/busi \\
        --external ../shared/data/breast_lesions_usg --cv runs/cv-busi-lite0 \\
        --run runs/cv-busi-lite0/ensemble --out docs/levers/annotations-lite0.json \\
        --figure docs/figures/annotation-mask-examples.png
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from busdx.config import load_config
from busdx.data.datasets import Sample, scan_dataset
from busdx.data.imaging import load_image
from busdx.data.preprocess import annotation_mask
from busdx.data.synthetic import make_lesion_image
from busdx.inference.batch import file_logits
from busdx.inference.predictor import load_model
from busdx.stats.metrics import bootstrap_ci, paired_bootstrap, roc_auc
from busdx.training.transforms import MaskAnnotations


def marked_shares(samples: list[Sample]) -> np.ndarray:
    return np.array([annotation_mask(load_image(s.path)).mean() for s in samples])


def shortcut(samples: list[Sample]) -> dict:
    """Marked-pixel share per class, and its AUC as a malignancy score (with a 95% CI)."""
    shares = marked_shares(samples)
    labels = np.array([s.label for s in samples])
    ci = bootstrap_ci(labels, shares, threshold=0.5, n_resamples=1000)["roc_auc"]
    return {
        "mean_marked_share": {
            "benign": float(shares[labels == 0].mean()),
            "malignant": float(shares[labels == 1].mean()),
        },
        "share_of_images_with_marks_over_1pct": {
            "benign": float((shares[labels == 0] > 0.01).mean()),
            "malignant": float((shares[labels == 1] > 0.01).mean()),
        },
        "roc_auc_of_marked_share": roc_auc(labels, shares),
        "ci": [ci["low"], ci["high"]],
    }


def masked_vs_kept(run: Path, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits of ``samples`` by the run's model, as is and with annotations masked."""
    loaded = load_model(run)
    paths = [s.path for s in samples]
    kept = file_logits(loaded, paths, progress=False)
    masked = replace(loaded, info=loaded.info.replace(
        preprocessing=replace(loaded.preprocessing, annotations="mask")
    ))  # fmt: skip
    return kept, file_logits(masked, paths, progress=False)


def compare(labels: np.ndarray, kept: np.ndarray, masked: np.ndarray) -> dict:
    return {
        "n": len(labels),
        "roc_auc_as_is": roc_auc(labels, kept),
        "roc_auc_masked": roc_auc(labels, masked),
        "masked_minus_as_is": paired_bootstrap(labels, masked, kept, n_resamples=2000),
    }


def figure(out: Path) -> None:
    """The detector on generated scans with drawn calipers, a dotted line and a label (no
    patient image leaves ../shared): as drawn (marks in red), then painted over."""
    rows = []
    for seed in range(3):
        scan, (cy, cx) = make_lesion_image(bool(seed % 2), seed=seed)
        scan = scan.convert("RGB")
        draw = ImageDraw.Draw(scan)
        for x, y in ((cx - 30, cy), (cx + 30, cy)):
            draw.line([(x - 4, y), (x + 4, y)], fill="white")
            draw.line([(x, y - 4), (x, y + 4)], fill="white")
        for x in range(cx - 26, cx + 27, 4):
            draw.point((x, cy), fill=(235, 235, 235))
        draw.text((10, 230), "RT 10H 2CMFN", fill="white")
        marks = annotation_mask(scan)
        shown = np.asarray(scan).copy()
        shown[marks] = (255, 0, 0)
        rows.append(np.concatenate([shown, np.asarray(MaskAnnotations()(scan))], axis=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="BUSI folder (class folders)")
    parser.add_argument("--external", required=True, help="external site (class folders)")
    parser.add_argument("--cv", required=True, help="a busdx cv folder trained on --data")
    parser.add_argument("--run", required=True, help="a run to score the external site with")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--figure", help="PNG of the detector on generated scans")
    args = parser.parse_args()
    classes = load_config().data.classes
    busi = scan_dataset(args.data, classes).samples
    site = scan_dataset(args.external, classes).samples
    by_path = {s.relpath: s for s in busi}

    labels, kept, masked = [], [], []
    for fold_dir in sorted(Path(args.cv).glob("fold-*")):
        with (fold_dir / "split.csv").open(newline="") as handle:
            tested = [by_path[r["path"]] for r in csv.DictReader(handle) if r["split"] == "test"]
        fold_kept, fold_masked = masked_vs_kept(fold_dir, tested)
        labels += [s.label for s in tested]
        kept += list(fold_kept)
        masked += list(fold_masked)
        print(f"{fold_dir.name}: {len(tested)} test images scored as is and masked", flush=True)
    site_kept, site_masked = masked_vs_kept(Path(args.run), site)
    site_labels = np.array([s.label for s in site])
    result = {
        "command": "python experiments/annotations.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "shortcut": {"busi": shortcut(busi), "external": shortcut(site)},
        "busi_cv_test_time_masking": compare(np.array(labels), np.array(kept), np.array(masked)),
        "external_test_time_masking": compare(site_labels, site_kept, site_masked),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=2))
    if args.figure:
        figure(Path(args.figure))


if __name__ == "__main__":
    main()
