"""Peak memory of ``busdx predict`` as the number of images grows (it should stay flat).

Writes N synthetic ultrasound-like PNGs (256x256) into a temporary folder, runs
``busdx predict --backend BACKEND`` over the folder in a fresh process for each N, and records
that process's peak resident memory (``wait4`` rusage) and its wall time.

    python benchmarks/predict_memory.py --run runs/busi-vgg16-frozen --counts 500 5000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from busdx.data.synthetic import make_lesion_image

from _common import REPO, machine_info, peak_rss_mb, write_json


def write_images(folder: Path, count: int) -> None:
    """``count`` PNG files: 50 distinct synthetic images, copied under distinct names."""
    distinct = []
    for index in range(50):
        path = folder / f"source-{index}.png"
        make_lesion_image(index % 2 == 1, size=256, seed=index)[0].save(path)
        distinct.append(path)
    for index in range(count - len(distinct)):
        shutil.copyfile(distinct[index % len(distinct)], folder / f"copy-{index:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--backend", default="onnx", choices=["torch", "onnx"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "predict_memory.json"))
    args = parser.parse_args()
    rows = []
    for count in args.counts:
        with tempfile.TemporaryDirectory() as folder:
            write_images(Path(folder), count)
            command = [sys.executable, "-m", "busdx", "predict", "--run", args.run,
                       "--backend", args.backend, "--batch-size", str(args.batch_size),
                       "--no-progress", "--out", str(Path(folder) / "predictions.csv"),
                       folder]  # fmt: skip
            peak, seconds = peak_rss_mb(command)
        rows.append({"images": count, "peak_rss_mb": round(peak), "seconds": round(seconds, 1)})
        print(f"{count} images: peak {peak:.0f} MB, {seconds:.0f} s", flush=True)
    write_json(Path(args.out), {"machine": machine_info(), "backend": args.backend,
                                "batch_size": args.batch_size, "runs": rows})  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
