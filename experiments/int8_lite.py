"""Does int8 keep an EfficientNet-Lite model's accuracy? fp32 ONNX against int8 variants of
onnxruntime's static QDQ quantization (what busdx export does; first and last layers in float;
only Conv and Gemm quantized, residual additions left in float; percentile calibration; 8-bit
instead of 7-bit weights; 8-bit weights with the last blocks, or the stem too, kept in float:
mixed precision), on a run's validation and test images: ROC AUC of each, the paired AUC
difference, decision agreement and the largest logit change::

    python experiments/int8_lite.py --run runs/loso3-lite0/fold-0 --out docs/release/int8-lite0.json
    python experiments/int8_lite.py --run runs/release-lite0-3sites-mask-lr10 --splits val \
        --calibration-size 200 --variants 8-bit --out docs/release/int8-mixed-lite0-3sites.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from busdx.fileio import json_safe
from busdx.inference.batch import file_logits
from busdx.inference.predictor import load_model
from busdx.runs import load_run, samples_for_split
from busdx.stats.metrics import paired_bootstrap
from busdx.workflows.export import (
    _calibration_files,
    _CalibrationImages,
    compare_logits,
    export_onnx,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration-size", type=int, default=100)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        metavar="TEXT",
        help="only the variants whose name contains one of these",
    )
    args = parser.parse_args()
    config, info = load_run(args.run)
    loaded = load_model(args.run, device="cpu")
    result: dict = {"run": str(args.run), "calibration_images": args.calibration_size}
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(loaded, Path(folder) / "model.onnx")
        calibration = _calibration_files(args.run, None, None, args.calibration_size)
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node
        weighted = [node.name for node in nodes if node.op_type in {"Conv", "Gemm", "MatMul"}]

        def in_float(*prefixes: str) -> list[str]:
            return [node.name for node in nodes if node.name.startswith(prefixes)]

        base = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        options = {
            "busdx export (all ops, minmax, 7-bit weights)": {},
            "first and last layers in float": {"nodes_to_exclude": [weighted[0], weighted[-1]]},
            "Conv and Gemm only (additions in float)": {"op_types_to_quantize": ["Conv", "Gemm"]},
            "percentile calibration": {"calibrate_method": CalibrationMethod.Percentile},
            "8-bit weights (VNNI CPUs only)": {"reduce_range": False},
            "8-bit weights, last two blocks and head in float": {
                "reduce_range": False,
                "nodes_to_exclude": in_float("/backbone.7", "/backbone.8", "/head", "/guard"),
            },
            "8-bit weights, stem, last two blocks and head in float": {
                "reduce_range": False,
                "nodes_to_exclude": in_float(
                    "/backbone.0", "/backbone.1", "/backbone.7", "/backbone.8", "/head", "/guard"
                ),
            },
            "8-bit weights, Conv and Gemm only, percentile": {
                "reduce_range": False,
                "op_types_to_quantize": ["Conv", "Gemm"],
                "calibrate_method": CalibrationMethod.Percentile,
            },
        }
        options = {name: option for name, option in options.items()
                   if any(text in name for text in args.variants)}  # fmt: skip
        variants = {}
        for index, (name, option) in enumerate(options.items()):
            variants[name] = Path(folder) / f"{index}.onnx"
            reader = _CalibrationImages(calibration, loaded)
            quantize_static(str(prepared), str(variants[name]), reader, **{**base, **option})
        for split in args.splits:
            samples = samples_for_split(args.run, config, info, None, split).samples
            files, labels = [s.input for s in samples], np.array([s.label for s in samples])
            reference = file_logits(load_model(fp32), files, progress=False)
            rows = {}
            for name, path in variants.items():
                candidate = file_logits(load_model(path), files, progress=False)
                rows[name] = {
                    **compare_logits(reference, candidate, labels, loaded).model_dump(),
                    "paired_delta_auc": paired_bootstrap(labels, candidate, reference,
                                                         n_resamples=1000),
                }  # fmt: skip
                print(split, name, {k: rows[name][k] for k in ("agreement", "roc_auc_drop")})
            result[split] = {"n": len(labels), "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
