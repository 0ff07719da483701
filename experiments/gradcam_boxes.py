"""Where does the model look? Grad-CAM inside vs outside the lesion box, whole-image vs ROI.

For every image with a lesion mask, the Grad-CAM map of a model that never trained on it (on
BUSI, the cross-validation fold model whose test fold holds the image; on the external site,
the cross-fitted ensemble of the five fold models), upsampled to the model's input, against
the lesion's box mapped into that input (a whole-image model sees the whole image squashed, an
ROI model the box with its margin, squashed). Reported per model and site: the share of the
map's mass inside the box, the box's share of the input (what a uniform map would give),
their ratio (concentration on the lesion, 1 = chance), and how often the map's peak falls in
the box (the pointing game), with 95% bootstrap CIs over images. Runs are merged into
``--out`` by name, so each model can be measured when its cross-validation is done.

Usage:
    python experiments/gradcam_boxes.py --cv whole=runs/cv-busi-lite0 \\
        --data ../shared/data/busi --external ../shared/data/breast_lesions_usg \\
        --out docs/levers/gradcam-boxes.json
    python experiments/gradcam_boxes.py --pair roi whole --out docs/levers/gradcam-boxes.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from busdx.data.boxes import crop_rectangle
from busdx.data.datasets import Sample, attach_boxes, scan_sites
from busdx.data.imaging import load_image
from busdx.inference.predictor import Predictor, load_model
from busdx.networks.gradcam import explain_image


def cam_on_box(loaded: Predictor, sample: Sample) -> tuple[float, float, bool]:
    """(share of the Grad-CAM mass in the lesion box, the box's share of the input, whether
    the map's peak is in the box) for one image."""
    prep = loaded.preprocessing
    if prep.crop != "none" or prep.resize != "squash":
        raise SystemExit("this measure maps boxes for data.crop none and data.resize squash")
    image = load_image(sample.path)
    if prep.region == "box":
        left, top, right, bottom = crop_rectangle(image, sample.box, margin=prep.box_margin)
    else:
        left, top, right, bottom = 0, 0, image.width, image.height
    cam = explain_image(loaded, image.crop((left, top, right, bottom))).cam
    size = prep.image_size
    heat = torch.nn.functional.interpolate(
        torch.from_numpy(cam)[None, None], size=(size, size), mode="bilinear"
    )[0, 0].numpy()
    x, y, w, h = sample.box
    scale_x, scale_y = size / (right - left), size / (bottom - top)
    x0, y0 = round((x - left) * scale_x), round((y - top) * scale_y)
    x1, y1 = round((x + w - left) * scale_x), round((y + h - top) * scale_y)
    inside = np.zeros_like(heat, dtype=bool)
    inside[max(y0, 0) : min(y1, size), max(x0, 0) : min(x1, size)] = True
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    return (
        float(heat[inside].sum() / max(heat.sum(), 1e-12)),
        float(inside.mean()),
        bool(inside[peak]),
    )


def summarize(values: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict:
    """Mean and 95% percentile-bootstrap CI over images."""
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(values.mean()), 4), "ci": [round(low, 4), round(high, 4)]}


def measure(models: list[Predictor], samples: list[Sample], desc: str) -> dict:
    rows = np.array([
        cam_on_box(model, sample)
        for model, sample in tqdm(list(zip(models, samples, strict=True)), desc=desc, unit="img")
    ])  # fmt: skip
    share, area, pointed = rows[:, 0], rows[:, 1], rows[:, 2]
    return {
        "images": len(rows),
        "cam_share_in_box": summarize(share),
        "box_share_of_input": summarize(area),
        "concentration": summarize(share / area),
        "peak_in_box": summarize(pointed),
        "per_image": {
            "cam_share_in_box": share.round(4).tolist(),
            "box_share_of_input": area.round(4).tolist(),
            "peak_in_box": pointed.astype(int).tolist(),
        },
    }


def pair(out: Path, a: str, b: str, seed: int = 0, resamples: int = 2000) -> None:
    """Paired bootstrap (same images) of A - B for the peak-in-box rate and the CAM share in
    the box, per site; stored under ``paired`` in ``out``."""
    payload = json.loads(out.read_text())
    first, second = payload["models"][a], payload["models"][b]
    rng = np.random.default_rng(seed)
    paired = {}
    for site in (key for key in first if isinstance(first[key], dict) and key in second):
        result = {}
        for measure_name in ("peak_in_box", "cam_share_in_box"):
            x = np.array(first[site]["per_image"][measure_name], dtype=float)
            y = np.array(second[site]["per_image"][measure_name], dtype=float)
            draws = [(lambda i: (x[i] - y[i]).mean())(rng.integers(0, len(x), len(x)))
                     for _ in range(resamples)]  # fmt: skip
            low, high = np.percentile(draws, [2.5, 97.5])
            result[measure_name] = {"delta": round(float((x - y).mean()), 4),
                                    "ci": [round(low, 4), round(high, 4)]}  # fmt: skip
        paired[site] = result
        print(site, result)
    payload.setdefault("paired", {})[f"{a} - {b}"] = paired
    out.write_text(json.dumps(payload, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", action="append", default=[], metavar="NAME=CVDIR")
    parser.add_argument("--data", help="the cross-validated site (with masks)")
    parser.add_argument("--external", help="an external site (with masks)")
    parser.add_argument("--out", required=True, help="JSON results (merged by name)")
    parser.add_argument(
        "--pair", nargs=2, metavar=("A", "B"),
        help="only add paired differences A - B (same images) of two measured models",
    )  # fmt: skip
    args = parser.parse_args()
    if args.pair:
        return pair(Path(args.out), *args.pair)
    torch.set_grad_enabled(True)
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    home = attach_boxes(scan_sites([args.data], ["benign", "malignant"]))
    away = attach_boxes(scan_sites([args.external], ["benign", "malignant"]))
    for entry in args.cv:
        name, _, folder = entry.partition("=")
        folder = Path(folder)
        with (folder / "folds.csv").open(newline="") as handle:
            folds = {row["path"]: int(row["fold"]) for row in csv.DictReader(handle)}
        fold_models = {k: load_model(folder / f"fold-{k}", device="cpu") for k in {*folds.values()}}
        ensemble = load_model(folder / "ensemble", device="cpu")
        payload["models"][name] = {
            "command": f"python experiments/gradcam_boxes.py --cv {entry} --data {args.data} "
            f"--external {args.external} --out {args.out}",
            "cv_dir": str(folder),
            "region": ensemble.preprocessing.region,
            home.site: measure(
                [fold_models[folds[s.relpath]] for s in home.samples],
                home.samples,
                f"{name} {home.site}",
            ),
            away.site: measure([ensemble] * len(away.samples), away.samples, f"{name} {away.site}"),
        }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for name, result in payload["models"].items():
        for site in (home.site, away.site):
            if site in result:
                r = result[site]
                print(f"{name:<8} {site:<20} CAM in box {r['cam_share_in_box']['mean']:.3f} "
                      f"(box {r['box_share_of_input']['mean']:.3f} of the input), "
                      f"concentration {r['concentration']['mean']:.2f}, "
                      f"peak in box {r['peak_in_box']['mean']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
