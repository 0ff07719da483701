"""Start-up of one prediction and of the service, and folder throughput, side by side.

Each arm is a fresh process timed from start to exit, with its peak resident memory (``wait4``
rusage), repeated and summarised by the median:

- ``bare``: a bare script (onnxruntime, Pillow, NumPy) scoring one scan with the bundled
  model's ONNX file that busdx picks on this CPU: the floor;
- ``busdx predict one.png``: this checkout, default backend (ONNX Runtime, no torch);
- ``busdx predict --backend torch``: this checkout, the PyTorch model;
- ``before``: ``busdx predict one.png`` from an earlier commit (a git worktree; its bundled
  model answered through torch);
- service cold start: create the app with the bundled model and answer ``/health``, this
  checkout and the earlier commit;
- folder throughput: ``busdx predict`` over a folder of synthetic scans, both commits;
- the lean install (``pip install .``, no extras) in a fresh virtual environment: its size on
  disk beside this development environment's, and ``busdx predict one.png`` run from it.

    python benchmarks/startup.py --before 2efd494
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from busdx.bundled import resolve_run
from busdx.data.synthetic import make_lesion_image
from busdx.inference.predictor import load_model

from _common import REPO, lean_install, machine_info, peak_rss_mb, write_json

BARE_SCRIPT = """
import json, sys
import numpy as np, onnxruntime
from PIL import Image
model, image = sys.argv[1:3]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["busdx"])
prep = meta["preprocessing"]
size = prep["image_size"]
pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR))
x = ((pixels.astype(np.float32) - prep["mean"]) / prep["std"]).transpose(2, 0, 1)[None]
logit = session.run(None, {"images": x.astype(np.float32)})[0][0]
print(1 / (1 + np.exp(-logit / meta.get("temperature", 1.0))))
"""
SERVE_SCRIPT = """
from fastapi.testclient import TestClient
from busdx.bundled import resolve_run
from busdx.serving import create_app
with TestClient(create_app(resolve_run(None))) as client:
    assert client.get("/health").status_code == 200
"""


def measure(command: list[str], repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall seconds and peak RSS (MB) of ``repeats`` fresh processes."""
    runs = [peak_rss_mb(command, env=env) for _ in range(repeats)]
    return {"seconds": round(statistics.median(s for _, s in runs), 2),
            "peak_rss_mb": round(statistics.median(m for m, _ in runs)),
            "repeats": repeats}  # fmt: skip


def size_mb(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed), in MB."""
    return round(sum(p.stat().st_size for p in folder.rglob("*")
                     if p.is_file() and not p.is_symlink()) / 2**20)  # fmt: skip


def worktree(commit: str, folder: Path) -> Path:
    """A checkout of ``commit`` (its src/ goes first on PYTHONPATH for the 'before' arms)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    return folder / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder-images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "startup.json")
    args = parser.parse_args()
    env = {**os.environ, "BUSDX_WEIGHTS_DIR": "/nonexistent"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = tmp / "one.png"
        make_lesion_image(True, size=256, seed=5)[0].save(scan)
        folder = tmp / "folder"
        folder.mkdir()
        for index in range(args.folder_images):
            make_lesion_image(index % 2 == 1, size=256, seed=index)[0].save(folder / f"{index}.png")
        old_env = {**env, "PYTHONPATH": str(worktree(args.before, tmp / "before"))}
        lean = lean_install(tmp / "lean")
        python, out = sys.executable, ["--out", str(tmp / "p.csv"), "--no-progress"]
        predict = [python, "-m", "busdx", "predict", str(scan), *out]
        # the file busdx's default backend picks on this CPU (int8 with VNNI or AMX, else fp32)
        onnx_file = str(load_model(resolve_run(None), backend="auto", device="cpu").path)
        arms = {
            "bare": ([python, "-c", BARE_SCRIPT, onnx_file, str(scan)], env),
            "predict": (predict, env),
            "predict_torch": ([*predict, "--backend", "torch"], env),
            "predict_lean": ([str(lean / "busdx"), *predict[3:]], env),
            "predict_before": (predict, old_env),
            "serve": ([python, "-c", SERVE_SCRIPT], env),
            "serve_before": ([python, "-c", SERVE_SCRIPT], old_env),
        }
        results = {}
        for name, (command, arm_env) in arms.items():
            results[name] = measure(command, args.repeats, arm_env)
            print(name, results[name], flush=True)
        folder_run = [python, "-m", "busdx", "predict", str(folder), *out]
        for name, arm_env in (("folder", env), ("folder_before", old_env)):
            seconds = measure(folder_run, 1, arm_env)
            results[name] = {
                **seconds,
                "img_per_s": round(args.folder_images / seconds["seconds"], 1),
            }
            print(name, results[name], flush=True)
        sizes = {"lean_install_mb": size_mb(tmp / "lean" / "venv"),
                 "development_install_mb": size_mb(Path(sys.prefix))}  # fmt: skip
        print(sizes)
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=REPO,
                       check=True)  # fmt: skip
    bare = results["bare"]["seconds"]
    ratios = {name: round(row["seconds"] / bare, 2) for name, row in results.items()
              if name.startswith("predict")}  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "before": args.before,
                          "model": Path(onnx_file).name, "folder_images": args.folder_images,
                          "results": results,
                          "seconds_vs_bare": ratios, "install_size": sizes})  # fmt: skip
    print("seconds / bare script:", ratios)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
