"""Does busdx keep its device fed, and does it scale out? Ratios measured side by side in one run.

* ``predict``: the model alone on preprocessed batches in memory (ONNX int8, as
  benchmarks/inference.py measures it; torch trunk + head in fp32 and, where the device has it,
  bf16) against end-to-end prediction of PNG files on disk (decode, preprocess, scope checks,
  score, CSV), with 0 loader workers and with the default number;
* ``ddp``: a training epoch with 1 process against ``torchrun`` with 2 processes (gloo);
* ``ray``: ``busdx predict --ray`` with 1 and 2 model actors on a local Ray instance.

On a GPU (``--device cuda``) the same ``predict`` section gives end-to-end img/s as a fraction
of the trunk-only rate. Writes JSON; ``report.py`` renders it into docs/benchmarks.md.

    python benchmarks/scaling.py --run runs/bench-vgg16 --data ../shared/data/busi \
        --split-file ../shared/docs/seed_recipe_busi_split.csv --out docs/benchmarks/scaling.json
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from training import subset_split

from busdx.data.synthetic import make_lesion_image
from busdx.devices import autocast, resolve_device
from busdx.hardware import cpu_has_bf16, resolve_workers
from busdx.inference.batch import predict_files, write_predictions
from busdx.inference.predictor import load_model
from busdx.layout import INT8_FILE

from _common import REPO, machine_info, throughput, write_json


def write_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct synthetic 256x256 scans as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        make_lesion_image(index % 2 == 1, size=256, seed=index)[0].save(path)
        paths.append(path)
    return paths


def end_to_end(run: Path, files: list[Path], out: Path, **options) -> float:
    """Images per second of files on disk -> CSV rows (the model loaded and warmed first)."""
    workers = options.pop("workers")
    predictor = load_model(run, **options)
    write_predictions(predict_files(predictor, files[:16], progress=False), out)  # warm-up
    started = time.perf_counter()
    rows = predict_files(predictor, files, batch_size=16, workers=workers, progress=False)
    count, failed = write_predictions(rows, out)
    assert count == len(files) and not failed
    return count / (time.perf_counter() - started)


def model_only(run: Path, device: torch.device, precision: str, seconds: float) -> float:
    """Images per second of the torch model on one preprocessed batch of 16 on the device."""
    predictor = load_model(run, device=str(device))
    size = predictor.preprocessing.image_size
    batch = torch.from_numpy(
        np.random.default_rng(0).uniform(-120, 150, (16, 3, size, size)).astype("f4")
    ).to(device)

    def run_batch() -> None:
        with torch.inference_mode(), autocast(device, precision):
            predictor.model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return throughput(run_batch, 16, min_seconds=seconds)


def predict_section(
    run: Path, device: torch.device, count: int, seconds: float, workers: int
) -> dict:
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        files = write_images(Path(folder) / "images", count)
        out = Path(folder) / "predictions.csv"
        if device.type == "cpu" and (run / INT8_FILE).is_file():
            session = onnxruntime.InferenceSession(
                str(run / INT8_FILE), providers=["CPUExecutionProvider"]
            )
            size = load_model(run, backend="onnx").preprocessing.image_size
            batch = np.random.default_rng(0).uniform(-120, 150, (16, 3, size, size)).astype("f4")
            model_rate = throughput(lambda: session.run(None, {"images": batch}), 16,
                                    min_seconds=seconds)  # fmt: skip
            rows["ONNX Runtime int8"] = {"model_only": model_rate}
            for n in (0, workers):
                rows["ONNX Runtime int8"][f"end_to_end_{n}_workers"] = end_to_end(
                    run, files, out, backend="onnx", workers=n
                )
                print(f"onnx int8, {n} workers: {rows['ONNX Runtime int8']}", flush=True)
        precisions = ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_has_bf16() else [])
        for precision in precisions:
            name = f"torch {precision}"
            rows[name] = {"model_only": model_only(run, device, precision, seconds)}
            for n in (0, workers):
                rows[name][f"end_to_end_{n}_workers"] = end_to_end(
                    run, files[: count // 2], out, backend="torch", device=str(device),
                    precision=precision, workers=n,
                )  # fmt: skip
            print(f"{name}: {rows[name]}", flush=True)
    return {"images": count, "batch_size": 16, "workers": workers,
            "default_workers": resolve_workers(-1), "img_per_s": rows}  # fmt: skip


def _epoch_seconds(run_dir: Path) -> list[float]:
    with (run_dir / "history.csv").open() as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def ddp_section(data: str, split_file: Path, train: int, epochs: int) -> dict:
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        split = subset_split(split_file, {"train": train, "val": 16}, Path(folder) / "split.csv")
        settings = [f"data.split_file={split}", f"train.epochs={epochs}", "data.test_fraction=0"]
        for processes in (1, 2):
            launcher = [sys.executable, "-m", "busdx"] if processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}", "-m", "busdx"]  # fmt: skip
            out = Path(folder) / f"p{processes}"
            command = [*launcher, "train", "--data", data, "--out", str(out), "--no-progress",
                       *(arg for item in settings for arg in ("--set", item))]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            epoch_seconds = _epoch_seconds(out)
            result[f"{processes} process(es)"] = {
                "command_seconds": round(time.perf_counter() - started, 1),
                "epoch_seconds": epoch_seconds,
                "mean_epoch_seconds_after_the_first": float(np.mean(epoch_seconds[1:])),
            }
            print(f"ddp {processes}: {result[f'{processes} process(es)']}", flush=True)
    return {"train_images": train, "epochs": epochs, "runs": result}


def ray_section(run: Path, count: int) -> dict:
    from busdx.workflows.cluster import predict_on_ray

    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        write_images(images, count)
        for workers in (1, 2):
            summary = predict_on_ray(run, [images], Path(folder) / f"ray{workers}.csv",
                                     workers=workers, progress=False)  # fmt: skip
            result[f"{workers} actor(s)"] = {
                "seconds_with_ray_start": round(summary.seconds, 1),
                "img_per_s": count / summary.seconds,
            }
            print(f"ray {workers}: {result[f'{workers} actor(s)']}", flush=True)
    return {"images": count, "model": sorted(p.name for p in run.glob("*.onnx")), "runs": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", required=True, help="run directory (exported: busdx export --int8)"
    )
    parser.add_argument("--data", help="dataset folder, for the ddp section")
    parser.add_argument("--split-file", help="split CSV of --data, for the ddp section")
    parser.add_argument("--sections", nargs="+", default=["predict", "ddp", "ray"],
                        choices=["predict", "ddp", "ray"])  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--workers", type=int, default=1, help="loader workers besides 0")
    parser.add_argument("--ddp-train", type=int, default=64)
    parser.add_argument("--ddp-epochs", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=10)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "scaling.json"))
    args = parser.parse_args()
    run, device = Path(args.run), resolve_device(args.device)
    out = Path(args.out)  # sections not measured now keep their earlier results
    result: dict = json.loads(out.read_text()) if out.is_file() else {}
    result.update(device=str(device), run=run.name)
    if "predict" in args.sections:
        result["predict"] = predict_section(run, device, args.images, args.min_seconds,
                                            args.workers)  # fmt: skip
    if "ddp" in args.sections:
        if not (args.data and args.split_file):
            parser.error("the ddp section needs --data and --split-file")
        result["ddp"] = ddp_section(args.data, Path(args.split_file), args.ddp_train,
                                    args.ddp_epochs)  # fmt: skip
    if "ray" in args.sections:
        result["ray"] = ray_section(run, args.images)
    for section in args.sections:
        result[section]["machine"] = machine_info()
    write_json(out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
