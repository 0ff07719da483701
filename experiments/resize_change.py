"""Did moving inference's resize from torchvision (uint8 tensor, antialiased) to Pillow change
what a trained model answers? A run's model scored on its validation images both ways (the old
step rebuilt here from torchvision), with the PyTorch network: largest probability change and
decision agreement at the model's threshold, ROC AUC of each::

    python experiments/resize_change.py --run runs/release-lite0-3sites-mask-lr10 \\
        --out docs/release/resize-pillow-vs-torchvision.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from busdx.data.imaging import as_input
from busdx.data.preprocess import load_region, model_input, normalize
from busdx.fileio import json_safe
from busdx.inference.predictor import load_model
from busdx.runs import load_run, samples_for_split
from busdx.stats.metrics import roc_auc


def torchvision_input(image, prep) -> np.ndarray:
    """The earlier inference step: PILToTensor, then torchvision's antialiased resize."""
    resize = v2.Resize((prep.image_size,) * 2, interpolation=v2.InterpolationMode(
        prep.interpolation), antialias=True)  # fmt: skip
    pixels = resize(v2.PILToTensor()(image.convert("RGB"))).permute(1, 2, 0).numpy()
    return normalize(pixels, prep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config, info = load_run(args.run)
    loaded = load_model(args.run, backend="torch", device="cpu")
    prep = loaded.preprocessing
    if prep.annotations != "keep" or prep.crop != "none" or prep.resize != "squash":
        raise SystemExit("this check rebuilds the plain squash-resize step only")
    samples = samples_for_split(args.run, config, info, None, "val").samples
    labels = np.array([s.label for s in samples])
    logits = {"pillow": [], "torchvision": []}
    for start in range(0, len(samples), 16):
        images = [load_region(as_input(s.input), prep) for s in samples[start : start + 16]]
        for name, step in (("pillow", model_input), ("torchvision", torchvision_input)):
            batch = np.stack([step(image, prep) for image in images])
            with torch.inference_mode():
                logits[name].append(loaded.predict(batch).logits)
    pillow, old = (np.concatenate(logits[k]) for k in ("pillow", "torchvision"))
    p_new, p_old = loaded.probabilities(pillow), loaded.probabilities(old)
    result = {
        "run": str(args.run), "split": "val", "n": len(labels), "threshold": loaded.threshold,
        "max_abs_probability_change": float(np.max(np.abs(p_new - p_old))),
        "median_abs_probability_change": float(np.median(np.abs(p_new - p_old))),
        "decision_agreement": float(np.mean(loaded.decide(p_new) == loaded.decide(p_old))),
        "roc_auc_pillow": roc_auc(labels, pillow), "roc_auc_torchvision": roc_auc(labels, old),
    }  # fmt: skip
    print(result)
    args.out.write_text(json.dumps(json_safe(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
