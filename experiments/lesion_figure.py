"""The README's example: a scan with the model's lesion outline, size, descriptors and
likelihood category beside it (``busdx predict``'s own row, drawn).

    python experiments/lesion_figure.py --run runs/loso3-lite0-mask/fold-2 \
        --out docs/figures/lesion-example.png

The scan is synthetic (``busdx.data.synthetic``): no patient image is committed to this project.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from busdx.data.synthetic import make_lesion_image
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model
from busdx.stats.likelihood import CATEGORY_LABEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--pixel-size", type=float, default=0.08, help="mm per pixel")
    args = parser.parse_args()
    image = make_lesion_image(True, size=320, seed=args.seed)[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic-scan.png"
        image.save(path)
        loaded = load_model(args.run, backend="torch")
        (row,) = predict_files(loaded, [path], progress=False,
                               spacing=(args.pixel_size, args.pixel_size))  # fmt: skip
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6),
                                         gridspec_kw={"width_ratios": [1, 1.1]})  # fmt: skip
    left.imshow(image, cmap="gray")
    if row.lesion is not None:
        xs, ys = zip(*row.lesion.outline, strict=True)
        left.plot(xs, ys, color="#ffb300", lw=2)
    left.set_title("synthetic scan, model's outline")
    left.axis("off")
    lesion = row.lesion
    text = [f"P(malignant) {row.probability:.3f} (calibrated)",
            f"label: {row.label or 'none (out of scope)'} at threshold {row.threshold:.3f}",
            f"likelihood category {row.likelihood_category}",
            f"  ({CATEGORY_LABEL})", ""]  # fmt: skip
    if lesion is not None:
        text += [f"size {lesion.long_axis:.1f} x {lesion.short_axis:.1f} {lesion.unit}",
                 f"shape {lesion.shape} (ellipse IoU {lesion.ellipse_iou:.2f}, "
                 f"solidity {lesion.solidity:.2f})",
                 f"orientation {lesion.orientation}",
                 f"margin {lesion.margin} (irregularity {lesion.margin_irregularity:.3f})",
                 f"posterior features {lesion.posterior or 'not measurable'}"]  # fmt: skip
    right.text(0, 1, "\n".join(text), va="top", family="monospace", fontsize=9)
    right.axis("off")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110, bbox_inches="tight")
    print("\n".join(text))


if __name__ == "__main__":
    main()
