"""The model that ships inside busdx: listed, loaded safely, and used by predict and serve when
no --run is given, with no weights folder, no data and no training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from busdx.bundled import DEFAULT_MODEL, bundled_info, list_bundled, resolve_run
from busdx.cli import main
from busdx.data.synthetic import make_lesion_image
from busdx.errors import UnknownModelError
from busdx.inference.predictor import load_model
from busdx.results import ExportReport
from busdx.serving import create_app


@pytest.fixture(autouse=True)
def _no_weights_folder(monkeypatch, tmp_path):
    """As on a user's machine: no ../shared, no weights folder."""
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path / "no-weights"))


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for index, malignant in enumerate((True, False, True)):
        path = folder / f"scan{index}.png"
        make_lesion_image(malignant, seed=70 + index, size=256)[0].save(path)
        paths.append(path)
    return paths


def test_the_default_model_ships_small_and_says_what_to_expect(capsys):
    assert DEFAULT_MODEL in list_bundled()
    info = bundled_info(DEFAULT_MODEL)
    assert info["size_mb"] <= 60 and info["outlines"]
    assert info["trained_on"] == ["busi", "bus_bra", "breast"]
    assert set(info["held_out_sites"]) == {"busi", "bus_bra", "breast"}
    assert "leave-one-site-out" in info["calibration_source"]
    export = ExportReport.read(resolve_run(None) / "export.json")  # the export's own schema
    assert (resolve_run(None) / "model.int8.onnx").is_file() == info["int8"]
    if info["int8"]:  # shipped only where it decides as the fp32 model on 97% of validation
        assert export.int8 is not None and export.int8.vs_fp32.agreement >= 0.97
    assert all(0 < row["dice"] <= 1 for row in info["held_out_sites"].values())
    card = (resolve_run(None) / "MODEL_CARD.md").read_text()
    assert "CC BY 4.0" in card and "doi:10.1038/s41597-024-02984-z" in card
    run_info = json.loads((resolve_run(None) / "run.json").read_text())
    assert "/" not in json.dumps(run_info["sites"])  # no local paths ship
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert f"{DEFAULT_MODEL} (default)" in listing and "outlines the lesion" in listing


def test_the_model_file_loads_as_tensors_only_and_carries_its_policy():
    payload = torch.load(resolve_run(None) / "model.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "busdx-model" and payload["class_names"] == ["benign", "malignant"]
    assert payload["preprocessing"]["mean"] == [127.0] * 3
    assert payload["calibration_cases"]["n"] == 2292  # every image of the three sites


def test_predict_with_no_run_uses_the_bundled_model(scans, tmp_path):
    out, overlays = tmp_path / "p.csv", tmp_path / "overlays"
    assert main(["predict", *map(str, scans), "--out", str(out), "--explain", str(overlays),
                 "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert any(row["lesion_shape"] for row in rows)  # the bundled model outlines
    threshold = bundled_info(DEFAULT_MODEL)["threshold"]
    assert len(rows) == 3 and all(not row["error"] for row in rows)
    for row in rows:
        probability = float(row["probability_malignant"])
        decided = "malignant" if probability >= threshold else "benign"
        assert row["out_of_scope"] in {"True", "False"}
        assert row["label"] == ("" if row["out_of_scope"] == "True" else decided)
        assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
    assert len(list(overlays.glob("*.png"))) == 3


def test_the_default_backend_answers_like_the_torch_model(scans):
    fast = load_model(resolve_run(None), backend="auto", device="cpu")
    assert fast.backend == "onnx" and fast.outlines  # int8 where it ships and is valid, else fp32
    exact = load_model(resolve_run(None), backend="torch")
    from busdx.inference.batch import predict_files

    a = list(predict_files(fast, scans, progress=False))
    b = list(predict_files(exact, scans, progress=False))
    int8 = fast.path.name == "model.int8.onnx"  # where it ships and the CPU has VNNI or AMX
    difference = [abs(x.probability - y.probability) for x, y in zip(a, b, strict=True)]
    assert max(difference) < (0.1 if int8 else 1e-4)
    assert all(x.lesion is not None for x in a)
    if not int8:  # fp32: the same outline, so the same descriptors
        assert [x.lesion.shape for x in a] == [y.lesion.shape for y in b]


def test_predict_and_serve_start_without_torch(scans, tmp_path):
    """A fresh process predicts with the bundled model and builds the service through ONNX
    Runtime, and never imports torch (issue 29: start-up is most of a single prediction)."""
    script = (
        "import sys\n"
        "from busdx.cli import main\n"
        f"assert main(['predict', {str(scans[0])!r}, '--out', {str(tmp_path / 'p.csv')!r}, "
        "'--no-progress']) == 0\n"
        "from busdx.bundled import resolve_run\n"
        "from busdx.serving import create_app\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(create_app(resolve_run(None))) as client:\n"
        "    assert client.get('/model').json()['backend'] == 'onnx'\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "BUSDX_WEIGHTS_DIR": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert row["lesion_shape"] and not row["error"]


def test_a_misspelt_model_name_is_a_one_line_error_with_a_suggestion(scans, capsys):
    assert main(["predict", "--run", "lite0-3site", str(scans[0])]) == 2
    assert "Did you mean 'lite0-3sites'" in capsys.readouterr().err
    with pytest.raises(UnknownModelError):
        resolve_run("no-such-model")
    assert resolve_run(str(scans[0])) == scans[0]  # a path is taken as it is


def test_serve_with_no_run_answers_with_the_bundled_model(scans):
    with TestClient(create_app(resolve_run(None))) as client:
        card = client.get("/model").json()
        assert card["threshold"] == pytest.approx(bundled_info(DEFAULT_MODEL)["threshold"])
        held_out = bundled_info(DEFAULT_MODEL)["held_out_sites"]
        kept = sum(row["sensitivity"] >= 0.95 for row in held_out.values())
        assert f"kept 0.95 at {kept} of {len(held_out)}" in card["threshold_basis"]
        answer = client.post("/predict", files=[("files", ("s.png", scans[0].read_bytes()))])
        assert answer.status_code == 200
        assert 0 < answer.json()["predictions"][0]["probability_malignant"] < 1
