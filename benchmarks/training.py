"""End-to-end training wall time of the default recipe, side by side on the same images.

Three ways to train the recipe (frozen VGG16 base, 30 epochs, batch 32, augmentation, validation
every epoch): the recipe's own Keras/TensorFlow loop (``--keras-python``), busdx's eager loop
(every epoch sends freshly augmented images through the base; with images decoded in the main
process, with loader workers, and with workers plus bf16 where the CPU has it), and busdx with
the feature cache
(K augmented views per image through the base once, cold cache; then the same run again on the
warm cache, as a second fold or run would see it). Images are a stratified subset of a split
file so that all three fit in one sitting on a CPU.

    python benchmarks/training.py --data BUSI/ --split-file split.csv --train 64 --val 16 \
        --keras-python /path/tf/python --out docs/benchmarks/training.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from busdx.config import apply_overrides, load_config
from busdx.hardware import cpu_has_bf16
from busdx.runs import prepare_dataset
from busdx.training.loop import fit

from _common import REPO, machine_info, write_json


def subset_split(split_file: Path, counts: dict[str, int], out: Path) -> Path:
    """A stratified random subset of a split CSV: ``counts[split]`` rows of train and val."""
    with split_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for split, count in counts.items():
        by_label = defaultdict(list)
        for row in rows:
            if row["split"].replace("validation", "val") == split:
                by_label[row["label"]].append(row)
        total = sum(len(group) for group in by_label.values())
        for label, group in sorted(by_label.items()):
            share = round(count * len(group) / total)
            for row in random.Random(0).sample(group, share):
                chosen.append({"path": row["path"], "label": label, "split": split})
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(chosen)
    return out


def busdx_fit(data: str, split: Path, run_dir: Path, overrides: list[str]) -> float:
    config = apply_overrides(load_config(), [f"data.split_file={split}", *overrides])
    dataset = prepare_dataset(config, data)
    started = time.perf_counter()
    fit(config, dataset, run_dir, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--train", type=int, default=64, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cache-views", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="loader workers besides 0")
    parser.add_argument("--keras-python", help="a Python with TensorFlow (optional)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "training.json"))
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        split = subset_split(
            Path(args.split_file), {"train": args.train, "val": args.val}, work / "split.csv"
        )
        epochs = [f"train.epochs={args.epochs}"]
        if args.keras_python:
            script = Path(__file__).with_name("keras_vgg16.py")
            command = [args.keras_python, str(script), "train", "--split", str(split),
                       "--data", args.data, "--epochs", str(args.epochs)]  # fmt: skip
            keras = json.loads(subprocess.run(command, capture_output=True, text=True,
                                              check=True).stdout)  # fmt: skip
            seconds["Keras/TensorFlow frozen-base loop (recipe)"] = keras["seconds"]
            print(f"keras: {keras['seconds']:.0f} s", flush=True)
        eager = {}
        for precision in ["fp32"] + (["bf16"] if cpu_has_bf16() else []):
            for workers in sorted({0, args.workers}):
                eager[f"busdx eager frozen-base loop, {workers} loader worker(s), {precision}"] = [
                    f"data.num_workers={workers}",
                    f"train.precision={precision}",
                ]
        for key, settings in eager.items():
            seconds[key] = busdx_fit(args.data, split, work / f"eager{len(seconds)}",
                                     [*epochs, *settings])  # fmt: skip
            print(f"{key}: {seconds[key]:.0f} s", flush=True)
        os.environ["BUSDX_CACHE_DIR"] = str(work / "cache")  # a cold cache
        cached = [*epochs, "train.feature_cache=true", f"train.cache_views={args.cache_views}"]
        for name, run in [("cold", "cached"), ("warm", "cached-again")]:
            key = f"busdx feature cache, {args.cache_views} views ({name} cache)"
            seconds[key] = busdx_fit(args.data, split, work / run, cached)
            print(f"{key}: {seconds[key]:.0f} s", flush=True)
    write_json(Path(args.out), {
        "machine": machine_info(), "epochs": args.epochs, "train_images": args.train,
        "cache_views": args.cache_views,
        "val_images": args.val, "seconds": seconds})  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
