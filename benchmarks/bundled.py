"""The bundled model as a new user meets it, side by side with the VGG16 int8 model, in one run.

* ``busdx predict one.png`` as a fresh process (interpreter start, imports, model load and one
  prediction), wall time, several repeats;
* ``busdx predict FOLDER --out p.csv`` over the same real scans, end to end (decoding, the scope
  guard, CSV), images per second, each model's default CPU backend (int8 ONNX when exported).

The VGG16 model only needs the speed of its network, not its accuracy: any VGG16 run exported
with ``--int8`` will do (``busdx train --data DATA --epochs 1`` then ``busdx export --int8
--allow-auc-drop``)::

    python benchmarks/bundled.py --vgg-run runs/bench-vgg16 \\
        --images ../shared/data/bus_bra/Images --count 1000 --out docs/benchmarks/bundled.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from busdx.bundled import DEFAULT_MODEL, bundled_info

from _common import REPO, machine_info, write_json

BUSDX = [sys.executable, "-m", "busdx"]


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vgg-run", required=True, help="a VGG16 run exported with --int8")
    parser.add_argument("--images", required=True, help="folder of real scans")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "bundled.json"))
    args = parser.parse_args()
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() == ".png")
    files = files[: args.count]
    models = {f"bundled {DEFAULT_MODEL}": DEFAULT_MODEL, "VGG16 int8": args.vgg_run}
    result: dict = {"machine": machine_info(), "images": len(files), "source": args.images}
    with tempfile.TemporaryDirectory() as folder:
        scans = Path(folder) / "scans"
        scans.mkdir()
        for path in files:
            shutil.copyfile(path, scans / path.name)
        one = [*BUSDX, "predict", str(files[0]), "--no-progress"]
        result["one_scan_wall_s"] = {}
        for name, run in models.items():
            walls = [_wall([*one, "--run", run]) for _ in range(args.repeats)]
            result["one_scan_wall_s"][name] = {"median": statistics.median(walls), "all": walls}
            print(f"{name}: busdx predict one.png {statistics.median(walls):.2f} s (median)")
        result["folder_img_per_s"] = {}
        for name, run in models.items():
            out = Path(folder) / f"{name.split()[0]}.csv"
            seconds = _wall([*BUSDX, "predict", "--run", run, str(scans), "--out", str(out),
                             "--no-progress"])  # fmt: skip
            result["folder_img_per_s"][name] = len(files) / seconds
            print(f"{name}: {len(files)} scans end to end, {len(files) / seconds:.1f} img/s")
    rates = list(result["folder_img_per_s"].values())
    result["folder_speedup"] = rates[0] / rates[1]
    result["bundled_size_mb"] = bundled_info(DEFAULT_MODEL)["size_mb"]
    print(f"bundled / VGG16 int8: {result['folder_speedup']:.2f}x; "
          f"bundled size {result['bundled_size_mb']} MB")  # fmt: skip
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
