"""Does int8 keep an EfficientNet-Lite model's accuracy? fp32 ONNX against two int8 variants
(every weighted layer quantized; first and last layers kept in float), on a run's validation and
test images: ROC AUC of each, the paired AUC difference, decision agreement and the largest
probability change::

    python experiments/int8_lite.py --run runs/loso3-lite0/fold-0 --out docs/release/int8-lite0.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from busdx.evaluation import json_safe
from busdx.export import _calibration_files, compare_logits, export_onnx, quantize_int8
from busdx.inference import file_logits
from busdx.metrics import paired_bootstrap
from busdx.predictor import load_model
from busdx.runs import load_run, samples_for_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration-size", type=int, default=100)
    args = parser.parse_args()
    config, info = load_run(args.run)
    loaded = load_model(args.run, device="cpu")
    result: dict = {"run": str(args.run), "calibration_images": args.calibration_size}
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(loaded, Path(folder) / "model.onnx")
        calibration = _calibration_files(args.run, None, None, args.calibration_size)
        variants = {}
        for name, float_edges in (("int8 all layers", False), ("int8, float edges", True)):
            path = Path(folder) / f"{float_edges}.onnx"
            variants[name] = quantize_int8(fp32, path, calibration, loaded, float_edges=float_edges)
        for split in ("val", "test"):
            samples = samples_for_split(args.run, config, info, None, split).samples
            files, labels = [s.input for s in samples], np.array([s.label for s in samples])
            reference = file_logits(load_model(fp32), files, progress=False)
            rows = {}
            for name, path in variants.items():
                candidate = file_logits(load_model(path), files, progress=False)
                rows[name] = compare_logits(reference, candidate, labels, loaded)
                rows[name]["paired_delta_auc"] = paired_bootstrap(labels, candidate, reference,
                                                                  n_resamples=1000)  # fmt: skip
                print(split, name, {k: rows[name][k] for k in ("agreement", "roc_auc_drop")})
            result[split] = {"n": len(labels), "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
