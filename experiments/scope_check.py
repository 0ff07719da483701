"""How often does the out-of-scope guard flag scans, and how often things that are not scans?

Runs a trained model (with its guard) over four groups and reports the share flagged:

* the run's own held-out test images (in scope by construction);
* an external site's scans (``--external``): in scope for the task, from another hospital;
* natural photos: scikit-image's sample images (``pip install scikit-image``);
* generated non-ultrasound inputs: colour noise, a 1x1 PNG, a 400x5 strip, flat colours,
  gradients, a page of text, a checkerboard.

Usage:
    python experiments/scope_check.py --run runs/NAME \\
        --external ../shared/data/breast_lesions_usg --out docs/levers/scope.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from busdx.data.inputs import iter_image_paths
from busdx.errors import DataError
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model
from busdx.runs import load_run, samples_for_split


def _generated(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    images = {
        "colour-noise": Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
        "one-pixel": Image.new("RGB", (1, 1), (128, 128, 128)),
        "strip-400x5": Image.new("RGB", (400, 5), (255, 255, 255)),
        "white": Image.new("RGB", (256, 256), (255, 255, 255)),
        "red": Image.new("RGB", (256, 256), (220, 30, 30)),
        "gradient": Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))),
        "checkerboard": Image.fromarray(
            (np.indices((256, 256)).sum(0) // 32 % 2 * 255).astype(np.uint8)
        ),
    }
    page = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(page)
    for row in range(0, 256, 14):
        draw.text((6, row), "Lorem ipsum dolor sit amet, consectetur", fill="black")
    images["text-page"] = page
    paths = []
    for name, image in images.items():
        paths.append(folder / f"{name}.png")
        image.save(paths[-1])
    return paths


def _photos(folder: Path) -> list[Path]:
    try:
        from skimage import data
    except ImportError:
        return []
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
             "hubble_deep_field", "immunohistochemistry", "retina", "cat", "text"]  # fmt: skip
    paths = []
    for name in names:
        try:
            array = np.asarray(getattr(data, name)())
        except Exception:  # not in this version, or fetched from the internet on demand
            continue
        if array.dtype != np.uint8:
            array = (255 * (array.astype(float) / max(array.max(), 1))).astype(np.uint8)
        paths.append(folder / f"{name}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--external", help="an external site's image folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    run = Path(args.run)
    loaded = load_model(run)
    config, info = load_run(run)
    groups: dict[str, list[Path]] = {}
    with contextlib.suppress(DataError):  # an ensemble of CV folds has no test split
        groups["own test split"] = [
            s.path for s in samples_for_split(run, config, info, None, "test").samples
        ]
    if args.external:
        groups["external site"] = list(iter_image_paths([args.external]))
        groups["external site"] = [p for p in groups["external site"] if "masks" not in p.parts]
    with tempfile.TemporaryDirectory() as tmp:
        groups["natural photos (scikit-image)"] = _photos(Path(tmp))
        groups["generated non-ultrasound"] = _generated(Path(tmp))
        results = {}
        for name, paths in groups.items():
            if not paths:
                continue
            rows = list(predict_files(loaded, paths, progress=False))
            flags = [bool(r.out_of_scope) for r in rows if r.error is None]
            results[name] = {
                "n": len(flags),
                "flagged": int(sum(flags)),
                "rate": float(np.mean(flags)),
                "examples": {
                    Path(r.path).name: bool(r.out_of_scope)
                    for r in rows[:20]
                    if r.error is None and name.startswith(("natural", "generated"))
                },
            }
            print(f"{name:<32} flagged {sum(flags)}/{len(flags)} ({np.mean(flags):.1%})")
    payload = {
        "command": f"python experiments/scope_check.py --run {args.run} --external "
        f"{args.external} --out {args.out}",
        "threshold": loaded.info.scope.threshold,
        "groups": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
