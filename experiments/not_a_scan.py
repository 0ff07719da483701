"""Is this a breast B-mode ultrasound image at all? busdx.inference.scope's pixel rules, measured.

Two sets: every image of the three development sites (real B-mode scans, each site
separately: none should be flagged) and a labelled "not a scan" set: the synthetic images of
:func:`busdx.data.synthetic.not_a_scan_images` and the sample images that scikit-image,
scikit-learn and matplotlib ship (photos, micrographs, text, a CT phantom, an MRI slice). Each
image is read as busdx reads a file (:func:`busdx.data.imaging.to_rgb`) and checked with
:func:`busdx.inference.scope.image_checks`. Writes the per-image verdicts and a summary.

Usage:
    python experiments/not_a_scan.py --out docs/scope
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

from busdx.data.datasets import scan_sites
from busdx.data.imaging import load_image, to_rgb
from busdx.data.synthetic import not_a_scan_images
from busdx.inference.scope import coloured_share, image_checks, texture_statistics

SITES = ("busi=../shared/data/busi", "bus_bra=../shared/data/bus_bra",
         "breast=../shared/data/breast_lesions_usg/labels.csv")  # fmt: skip
SKIMAGE = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
           "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
           "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
           "rocket", "shepp_logan_phantom", "text")  # fmt: skip


def package_images() -> dict[str, Image.Image]:
    """Sample images shipped by scikit-image, scikit-learn and matplotlib."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = {}
    for name in SKIMAGE:
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype != np.uint8:
            array = (array / max(float(array.max()), 1e-9) * 255).astype(np.uint8)
        images[f"skimage-{name}"] = Image.fromarray(array)
    for path in load_sample_images().filenames:
        images[f"sklearn-{Path(path).stem}"] = Image.open(path)
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    images["matplotlib-grace_hopper"] = Image.open(sample / "grace_hopper.jpg")
    raw = np.frombuffer(gzip.decompress((sample / "s1045.ima.gz").read_bytes()), np.uint16)
    images["matplotlib-mri-slice"] = Image.fromarray(raw.reshape(256, 256))
    return images


def _statistics(image: Image.Image) -> dict[str, float]:
    """What the rules look at: size, aspect ratio, coloured share and the texture statistics."""
    width, height = image.size
    return {"smallest_side": float(min(width, height)),
            "aspect_ratio": max(width, height) / min(width, height),
            "coloured_share": coloured_share(image),
            **texture_statistics(image.convert("L"))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for scans.csv, not-scans.csv, "
                        "not-a-scan.json")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"command": "python experiments/not_a_scan.py --out " + args.out,
                     "real_scans": {}, "not_scans": {}}  # fmt: skip
    rows = []
    dataset = scan_sites(list(SITES), ["benign", "malignant"])
    for site in dataset.sites:
        mine = [s for s in dataset.samples if s.site == site]
        flagged, measured = 0, []
        for sample in mine:
            image = load_image(sample.path)
            reasons = image_checks(image)
            flagged += bool(reasons)
            rows.append([site, sample.relpath, "; ".join(reasons)])
            measured.append(_statistics(image))
        summary["real_scans"][site] = {
            "n": len(mine), "flagged": flagged, "flagged_rate": flagged / len(mine),
            "ranges": {key: [float(np.nanmin([m[key] for m in measured])),
                             float(np.nanmax([m[key] for m in measured]))]
                       for key in measured[0]},
        }  # fmt: skip
    with (out / "scans-flagged.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["site", "path", "reasons"]] + [r for r in rows if r[2]])
    candidates = {**{f"synthetic-{k}": v for k, v in not_a_scan_images(0).items()},
                  **package_images()}  # fmt: skip
    verdicts = []
    for name, image in candidates.items():
        reasons = image_checks(to_rgb(image))
        verdicts.append([name, image.mode, "; ".join(reasons)])
    with (out / "not-scans.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "mode", "reasons"], *verdicts])
    missed = [name for name, _, reasons in verdicts if not reasons]
    summary["not_scans"] = {"n": len(verdicts), "flagged": len(verdicts) - len(missed),
                            "missed": missed}  # fmt: skip
    (out / "not-a-scan.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
