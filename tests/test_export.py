"""ONNX export, int8 quantization with its accuracy guard, and the onnx predict backend."""

import csv
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from busdx.cli import main
from busdx.data.inputs import iter_image_paths
from busdx.errors import CheckpointError, ExportError
from busdx.fileio import sha256_file
from busdx.inference.batch import file_logits, predict_files
from busdx.inference.model_file import read_model_file, update_model_file
from busdx.inference.predictor import load_model
from busdx.results import ExportReport
from busdx.serving import ServeSettings, create_app
from busdx.workflows.export import export_run

from conftest import FAST, train_run


@pytest.fixture(scope="module")
def trained_run(synthetic_data, tmp_path_factory, backbone_weights):
    pretrained = [arg for arg in FAST if arg not in {"--weights", "none"}]
    pretrained += ["--weights", backbone_weights]  # ImageNet where present: realistic activations
    return train_run(synthetic_data, tmp_path_factory.mktemp("runs") / "run", *pretrained, epochs=3)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture
def images(synthetic_data):
    return sorted(iter_image_paths([synthetic_data]))


def test_fp32_onnx_matches_torch_and_carries_the_metadata(run_copy, images, capsys):
    assert main(["export", "--run", str(run_copy)]) == 0
    assert "fp32 ONNX" in capsys.readouterr().out
    torch_model, onnx_model = load_model(run_copy), load_model(run_copy, backend="onnx")
    assert onnx_model.backend == "onnx" and onnx_model.path.name == "model.onnx"
    np.testing.assert_allclose(
        file_logits(onnx_model, images, progress=False),
        file_logits(torch_model, images, progress=False),
        rtol=1e-4,
        atol=1e-4,
    )
    exported = onnx_model.info.replace(provenance=torch_model.info.provenance,
                                       int8_weight_bits=None)  # fmt: skip
    assert exported == torch_model.info  # all but where and how it was exported
    report = ExportReport.read(run_copy / "export.json")
    assert report.onnx.vs_torch.max_abs_logit_difference < 1e-3
    assert report.int8 is None and not (run_copy / "model.int8.onnx").exists()
    graph_input = onnx.load(run_copy / "model.onnx").graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch

    out = run_copy / "onnx-eval"
    evaluate = ["evaluate", "--run", str(run_copy), "--backend", "onnx", "--out", str(out)]
    assert main([*evaluate, "--no-progress"]) == 0
    by_onnx = json.loads((out / "metrics.json").read_text())
    by_torch = json.loads((run_copy / "metrics.json").read_text())
    assert by_onnx["n"] == by_torch["n"] == 6
    assert by_onnx["roc_auc"] == pytest.approx(by_torch["roc_auc"], abs=1e-6)


def test_int8_export_agrees_with_fp32_and_onnx_backend_prefers_it(run_copy, images, caplog):
    report = export_run(run_copy, int8=True, calibration_size=12)
    assert report.int8.calibration.images == 12
    check = report.int8.vs_fp32
    assert check.n == 6 and check.agreement >= 5 / 6
    assert ExportReport.read(run_copy / "export.json") == report  # the file holds the result
    quantized = onnx.load(run_copy / "model.int8.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    size = {name: (run_copy / name).stat().st_size for name in ("model.onnx", "model.int8.onnx")}
    assert size["model.int8.onnx"] < size["model.onnx"] / 3
    loaded = load_model(run_copy, backend="onnx")
    assert loaded.path.name == "model.int8.onnx"
    fp32 = load_model(run_copy / "model.onnx")
    int8_logits = file_logits(loaded, images, progress=False)
    fp32_logits = file_logits(fp32, images, progress=False)
    assert np.corrcoef(int8_logits, fp32_logits)[0, 1] > 0.95

    out = run_copy / "pred.csv"
    assert main(["predict", "--run", str(run_copy), "--backend", "onnx", *map(str, images[:5]),
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    expected = loaded.probabilities(int8_logits[:5])  # what the int8 model said above
    assert [float(r["probability_malignant"]) for r in rows] == pytest.approx(expected, abs=1e-5)
    assert "onnx backend, model.int8.onnx" in caplog.text

    dequantized = sum(node.op_type == "DequantizeLinear" for node in quantized.graph.node)
    mixed = export_run(run_copy, int8=True, calibration_size=12, keep_float=["/head"], force=True)
    assert mixed.int8.kept_in_float == ["/head"]  # recorded in export.json
    kept = onnx.load(run_copy / "model.int8.onnx").graph.node
    assert sum(node.op_type == "DequantizeLinear" for node in kept) < dequantized
    assert all(node.op_type != "QLinearMatMul" for node in kept if node.name.startswith("/head"))

    export_run(run_copy)  # fp32 only: the int8 file of the earlier export must not survive
    assert not (run_copy / "model.int8.onnx").exists()
    assert load_model(run_copy, backend="onnx").path.name == "model.onnx"


def test_exports_are_stamped_and_a_stale_one_is_refused(run_copy, images, capsys):
    export_run(run_copy)
    stamp = load_model(run_copy, backend="onnx").info.provenance.exported_from
    assert stamp == {"file": "model.pt", "sha256": sha256_file(run_copy / "model.pt")}
    info, _ = read_model_file(run_copy / "model.pt")  # as a recalibration or a resume would
    update_model_file(run_copy / "model.pt", info.replace(threshold=0.123))
    with pytest.raises(CheckpointError, match=r"not exported from the model\.pt beside it"):
        load_model(run_copy, backend="onnx")
    args = ["predict", "--run", str(run_copy), "--backend", "onnx", str(images[0])]
    assert main(args) == 2 and "busdx export --run" in capsys.readouterr().err
    export_run(run_copy)  # exported again: accepted, with the new threshold
    assert load_model(run_copy, backend="onnx").threshold == pytest.approx(0.123)


def test_an_onnx_only_deployment_predicts_and_serves(run_copy, images, tmp_path):
    export_run(run_copy)
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    shutil.copy(run_copy / "model.onnx", deployed)  # no model.pt, no run.json
    out = tmp_path / "p.csv"
    args = ["predict", "--run", str(deployed), "--backend", "onnx", *map(str, images[:3])]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    by_file = [float(r["probability_malignant"]) for r in csv.DictReader(out.open())]
    app = create_app(deployed, ServeSettings(backend="onnx"))
    with TestClient(app) as client:
        upload = [("files", (images[0].name, images[0].read_bytes(), "image/png"))]
        answer = client.post("/predict", files=upload).json()
        assert answer["backend"] == "onnx"
        assert answer["predictions"][0]["probability_malignant"] == pytest.approx(by_file[0])
        explained = client.post("/explain", files=[("file", upload[0][1])])
        assert explained.status_code == 501 and "model.pt" in explained.json()["detail"]


def test_int8_guard_refuses_and_keeps_only_fp32(run_copy, capsys):
    with pytest.raises(ExportError, match="lowers validation ROC AUC"):
        export_run(run_copy, int8=True, calibration_size=4, max_auc_drop=-1.0)
    assert (run_copy / "model.onnx").exists() and not (run_copy / "model.int8.onnx").exists()
    assert not list(run_copy.glob(".*onnx*"))  # no temporary files left
    args = ["export", "--run", str(run_copy), "--int8", "--calibration-size", "4"]
    assert main([*args, "--max-auc-drop", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*args, "--max-auc-drop", "-1", "--allow-auc-drop"]) == 0
    report = ExportReport.read(run_copy / "export.json")
    assert report.int8.accepted_auc_drop is True


def test_calibration_folder_with_a_broken_file(run_copy, synthetic_data, tmp_path):
    folder = tmp_path / "calibration"
    shutil.copytree(synthetic_data / "benign", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    report = export_run(run_copy, int8=True, calibration_dir=folder, calibration_size=100)
    assert report.int8.calibration.images == 13  # the broken file is skipped
    assert (run_copy / "model.int8.onnx").exists()


def test_onnx_backend_without_export_is_a_user_error(trained_run, images, capsys):
    code = main(["predict", "--run", str(trained_run), "--backend", "onnx", str(images[0])])
    assert code == 2
    assert "busdx export --run" in capsys.readouterr().err


def test_predict_streams_from_a_generator_and_writes_json(trained_run, synthetic_data, tmp_path):
    loaded = load_model(trained_run)
    paths = iter_image_paths([synthetic_data])
    assert not isinstance(paths, list)  # lazy: folders are walked while predicting
    rows = list(predict_files(loaded, paths, batch_size=5, progress=False))
    assert len(rows) == 24 and all(r.error is None for r in rows)
    out = tmp_path / "p.json"
    assert main(["predict", "--run", str(trained_run), str(synthetic_data), "--out", str(out),
                 "--no-progress", "--batch-size", "7"]) == 0  # fmt: skip
    written = json.loads(out.read_text())
    assert [r["probability_malignant"] for r in written] == pytest.approx(
        [r.probability for r in rows],
        abs=1e-4,  # batch size changes float rounding only
    )


def test_stdout_csv_is_parseable(trained_run, synthetic_data, capsys):
    assert main(["predict", "--run", str(trained_run), str(synthetic_data / "benign"),
                 "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"benign", "malignant"}
    assert read_model_file(trained_run / "model.pt")[0].class_names == ("benign", "malignant")


def test_train_export_then_predict_and_serve_use_the_int8_model_by_default(
    synthetic_data, tmp_path, images, caplog, backbone_weights
):
    pretrained = [arg for arg in FAST if arg not in {"--weights", "none"}]
    run = train_run(synthetic_data, tmp_path / "run", *pretrained, "--weights", backbone_weights,
                    "--export", epochs=1)  # fmt: skip
    assert (run / "model.int8.onnx").is_file()  # seeded: the int8 guard accepts this model
    assert main(["predict", "--run", str(run), str(images[0]), "--no-progress"]) == 0
    assert "using model.int8.onnx" in caplog.text
    with TestClient(create_app(run, ServeSettings(workers=2))) as client:
        assert client.get("/health").json()["backend"] == "onnx"
        session = client.app.state.service.predictor.engine.session
        assert session.get_session_options().intra_op_num_threads == max(1, os.cpu_count() // 2)
    info, _ = read_model_file(run / "model.pt")  # changed since the export: both are stale
    update_model_file(run / "model.pt", info.replace(threshold=0.2))
    caplog.clear()
    assert load_model(run, backend="auto").backend == "torch"  # both exports are stale
    assert "was not exported from the model.pt beside it" in caplog.text
    assert "passing it over" in caplog.text


def test_8_bit_int8_weights_are_used_only_on_a_cpu_with_vnni(run_copy, monkeypatch, capsys):
    args = ["export", "--run", str(run_copy), "--int8", "--calibration-size", "8"]
    assert main([*args, "--int8-weight-bits", "8", "--allow-auc-drop"]) == 0
    report = ExportReport.read(run_copy / "export.json")
    assert report.int8.weight_bits == 8
    assert load_model(run_copy, backend="onnx").info.int8_weight_bits == 8
    monkeypatch.setattr("busdx.inference.predictor.cpu_has_vnni", lambda: True)
    assert load_model(run_copy, device="cpu", backend="auto").path.name == "model.int8.onnx"
    monkeypatch.setattr("busdx.inference.predictor.cpu_has_vnni", lambda: False)  # an AVX2-only CPU
    assert load_model(run_copy, device="cpu", backend="auto").path.name == "model.onnx"  # fp32
    with pytest.raises(SystemExit):  # argparse: 7 or 8 only
        main([*args, "--int8-weight-bits", "6"])
    assert "invalid choice: 6" in capsys.readouterr().err


def test_the_exported_model_carries_the_out_of_scope_guard(run_copy, images, tmp_path):
    export_run(run_copy)
    outputs = [o.name for o in onnx.load(run_copy / "model.onnx").graph.output]
    assert outputs == ["logits", "scope_distance"]
    flat = tmp_path / "flat.png"  # a uniform image: out of scope by its pixels
    Image.new("RGB", (200, 200), (90, 90, 90)).save(flat)
    files = [*images[:4], flat]
    by_torch = list(predict_files(load_model(run_copy), files, progress=False))
    by_onnx = list(predict_files(load_model(run_copy, backend="onnx"), files, progress=False))
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert b.scope_distance == pytest.approx(a.scope_distance, rel=1e-3)
        assert (a.out_of_scope, a.scope_reason) == (b.out_of_scope, b.scope_reason)
    assert by_onnx[-1].out_of_scope and "uniform" in by_onnx[-1].scope_reason
