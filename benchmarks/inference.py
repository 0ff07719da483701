"""Inference speed of the recipe's network, side by side, at batch 1, 8 and 32 (img/s).

Backends: Keras/TensorFlow (the recipe's stack, with ``--keras-python``), torch eager fp32
(NCHW, as torchvision ships it), torch as busdx runs it (channels_last), torch.compile, torch
bf16 autocast (only where the CPU has native bf16), ONNX Runtime fp32 and int8 (the run's
exported models; ``busdx export --run RUNDIR --int8`` first). Writes JSON; ``report.py`` turns
the results into docs/benchmarks.md.

    python benchmarks/inference.py --run runs/busi-vgg16-frozen --keras-python /path/tf/python \
        --out docs/benchmarks/inference.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from busdx.hardware import cpu_has_bf16
from busdx.inference.predictor import load_model
from busdx.layout import INT8_FILE, ONNX_FILE
from busdx.networks.classifier import BinaryClassifier

from _common import REPO, machine_info, throughput, write_json

Runner = Callable[[torch.Tensor], object]


def _inference(function: Callable[[torch.Tensor], object]) -> Runner:
    def run(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return function(x)

    return run


def torch_runners(model: BinaryClassifier) -> dict[str, Runner]:
    """Every torch variant, each a function of one preprocessed batch."""
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    runners = {
        "torch eager fp32 (NCHW)": _inference(lambda x: plain.head(plain.backbone(x))),
        "torch fp32 channels_last (busdx)": _inference(model),
        "torch.compile fp32 channels_last": _inference(torch.compile(model)),
    }
    if cpu_has_bf16():

        def bf16(x: torch.Tensor) -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)

        runners["torch bf16 autocast"] = _inference(bf16)
    return runners


def onnx_runner(path: Path) -> Runner:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})


def keras(python: str, batch_sizes: list[int], min_seconds: float) -> dict[str, float]:
    script = Path(__file__).with_name("keras_vgg16.py")
    command = [python, str(script), "infer", "--min-seconds", str(min_seconds),
               "--batch-sizes", *map(str, batch_sizes)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return {"version": result["tensorflow"], **result["img_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with model.pt + ONNX files")
    parser.add_argument("--keras-python", help="a Python with TensorFlow (optional)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--min-seconds", type=float, default=10)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "inference.json"))
    args = parser.parse_args()
    run = Path(args.run)
    for name in (ONNX_FILE, INT8_FILE):
        if not (run / name).is_file():
            parser.error(f"{run / name} missing: run busdx export --run {run} --int8 first")

    loaded = load_model(run, device="cpu")
    size = loaded.preprocessing.image_size
    runners = torch_runners(loaded.model.eval())
    runners["ONNX Runtime fp32"] = onnx_runner(run / ONNX_FILE)
    runners["ONNX Runtime int8 (static QDQ)"] = onnx_runner(run / INT8_FILE)
    results: dict[str, dict] = {}
    if args.keras_python:
        print("Keras/TensorFlow ...", flush=True)
        results["Keras/TensorFlow fp32 (recipe)"] = keras(
            args.keras_python, args.batch_sizes, args.min_seconds
        )
    for name, runner in runners.items():
        row: dict = {}
        for batch in args.batch_sizes:
            images = torch.from_numpy(
                np.random.default_rng(0).uniform(-120, 150, (batch, 3, size, size)).astype("f4")
            )
            started = time.perf_counter()
            runner(images)  # first call: includes compilation where there is one
            if batch == args.batch_sizes[0]:
                row["first_call_seconds"] = round(time.perf_counter() - started, 2)
            row[str(batch)] = throughput(
                lambda runner=runner, images=images: runner(images),
                batch,
                min_seconds=args.min_seconds,
            )
            print(f"{name:<36} batch {batch:>2}: {row[str(batch)]:6.2f} img/s", flush=True)
        results[name] = row
    write_json(Path(args.out), {"machine": machine_info(), "image_size": size,
                                "batch_sizes": args.batch_sizes, "img_per_s": results})  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
