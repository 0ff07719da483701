"""`pip install busdx` is inference only: in a fresh virtual environment without torch, the
bundled model predicts (with its outline), evaluates labelled images and serves over HTTP, and
a training command says which extra it needs instead of failing with a traceback."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from busdx.data.synthetic import write_synthetic_dataset

from conftest import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))
from _common import lean_install


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install .`` (no extras) of this checkout; its ``bin`` folder."""
    try:
        return lean_install(tmp_path_factory.mktemp("lean"))
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUSDX_WEIGHTS_DIR": str(cwd / "no-weights"), "PYTHONPATH": ""}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)  # fmt: skip


def test_the_lean_install_has_no_torch(lean, tmp_path):
    done = _run(lean, "python", "-c", "import torch", cwd=tmp_path)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_the_lean_install_predicts_and_evaluates_with_the_bundled_model(lean, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_per_class=4, seed=3)
    scan = next((data / "malignant").glob("*.png"))
    done = _run(lean, "busdx", "predict", str(scan), "--out", "p.csv", "--no-progress",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert 0 < float(row["probability_malignant"]) < 1 and row["lesion_shape"]
    assert "onnx backend" in done.stderr
    evaluate = ["evaluate", "--run", "lite0-3sites", "--data", str(data), "--split", "all"]
    done = _run(lean, "busdx", *evaluate, "--backend", "onnx", "--out", "eval", "--no-progress",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8


def test_what_needs_torch_in_the_lean_install_names_the_extra(lean, tmp_path):
    done = _run(lean, "busdx", "train", "--data", str(tmp_path), "--out", "run", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pip install 'busdx[train]'" in done.stderr
    data = write_synthetic_dataset(tmp_path / "labelled", n_per_class=1, seed=5)
    done = _run(
        lean,
        "busdx",
        "evaluate",
        "--run",
        "lite0-3sites",
        "--data",
        str(data),
        "--split",
        "all",
        cwd=tmp_path,
    )  # evaluate's default backend is torch's
    assert done.returncode == 2 and "use --backend onnx" in done.stderr
    scan = write_synthetic_dataset(tmp_path / "data", n_per_class=1, seed=4) / "benign"
    done = _run(lean, "busdx", "predict", str(scan), "--explain", "overlays", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr  # Grad-CAM needs torch
    assert "pip install 'busdx[train]'" in done.stderr


def test_the_lean_install_serves(lean, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BUSDX_WEIGHTS_DIR": str(tmp_path), "PYTHONPATH": ""}
    server = subprocess.Popen([str(lean / "busdx"), "serve", "--port", str(port)], cwd=tmp_path,
                              env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        health = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as answer:
                    health = json.loads(answer.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok" and health["backend"] == "onnx"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dicom_results_in_the_lean_install_name_the_pacs_extra(lean, tmp_path):
    from busdx.data.synthetic import make_lesion_image, ultrasound_dicom

    scan = make_lesion_image(True, size=128, seed=1)[0].convert("L")
    ultrasound_dicom([scan]).save_as(tmp_path / "scan.dcm", enforce_file_format=True)
    done = _run(lean, "busdx", "predict", "scan.dcm", "--dicom-out", "results", "--no-progress",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--dicom-out needs highdicom" in done.stderr and "busdx[pacs]" in done.stderr
