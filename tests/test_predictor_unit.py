"""The Predictor on a tiny untrained model written to disk: no training, so every rule of
loading and deciding is checked in seconds (and by mutation testing, docs/quality.md)."""

import dataclasses
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import busdx.inference.predictor as predictor_module
from busdx.config import load_config
from busdx.data.synthetic import make_lesion_image
from busdx.errors import CheckpointError, ConfigError
from busdx.inference.model_file import (
    ModelInfo,
    read_model_file,
    update_model_file,
    write_model_file,
)
from busdx.inference.predictor import load_model
from busdx.layout import INT8_FILE, MODEL_FILE, ONNX_FILE
from busdx.networks.classifier import create_model
from busdx.stats.calibration import Calibration
from busdx.training.scope_fit import logits_and_features

T, THRESHOLD = 2.0, 0.4


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    config = load_config()
    config.model.weights, config.data.image_size = "none", 32
    torch.manual_seed(0)
    model, weights, prep = create_model(config.model, image_size=32)
    info = ModelInfo.for_training(config, {"name": weights.name, "sha256": weights.sha256},
                                  prep, ["benign", "malignant"])  # fmt: skip
    info = info.calibrated_with(Calibration(threshold=THRESHOLD, temperature=T))
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    write_model_file(path, info, state_dict=model.state_dict())
    return path


def _scan(seed: int) -> Image.Image:
    return make_lesion_image(bool(seed % 2), size=128, seed=seed)[0].convert("RGB")


def test_probabilities_are_the_sigmoid_of_logit_over_temperature(model_file):
    predictor = load_model(model_file)
    logits = np.array([-3.0, 0.0, 1.0, 4.0])
    expected = 1 / (1 + np.exp(-logits / T))
    assert predictor.probabilities(logits) == pytest.approx(expected, abs=1e-12)
    assert predictor.probabilities(torch.tensor(logits)) == pytest.approx(expected, abs=1e-12)
    assert (predictor.threshold, predictor.temperature) == (THRESHOLD, T)


def test_decisions_at_and_around_the_threshold(model_file):
    predictor = load_model(model_file)
    edge = np.nextafter(THRESHOLD, 0.0)
    assert predictor.decide(np.array([edge, THRESHOLD, 0.9])).tolist() == [False, True, True]
    assert [predictor.label(p) for p in (0.1, THRESHOLD, 0.99)] == [
        "benign", "malignant", "malignant",
    ]  # fmt: skip
    assert predictor.label(0.5, threshold=0.6) == "benign"
    assert predictor.label(0.6, threshold=0.6) == "malignant"


def test_decide_images_scores_each_region_with_the_network(model_file):
    predictor = load_model(model_file)
    images = [_scan(1), _scan(2)]
    regions = [image.crop((8, 8, 40, 40)) for image in images]
    decisions = predictor.decide_images(images, regions=regions)
    inputs = predictor.inputs(regions)
    with torch.inference_mode():
        logits = predictor.model(torch.from_numpy(inputs)).double().numpy()
    for decision, logit in zip(decisions, logits, strict=True):
        assert decision.logit == pytest.approx(logit, abs=1e-5)
        assert decision.probability == pytest.approx(1 / (1 + np.exp(-logit / T)), abs=1e-6)
        assert decision.label == ("malignant" if decision.probability >= THRESHOLD else "benign")
        assert decision.scope_distance is None
    assert predictor.decide_images([]) == []
    whole = predictor.decide_images(images)  # no regions: the whole image
    assert whole[0].logit != pytest.approx(decisions[0].logit, abs=1e-6)


def test_only_the_pixel_rules_withhold_a_label_the_distance_does_not(model_file):
    predictor = load_model(model_file)
    assert predictor.scope_reason([]) is None
    assert predictor.scope_reason(["colour image", "too small"]) == "colour image; too small"
    far = np.zeros((1, 3, 32, 32), dtype=np.float32)
    width = logits_and_features(predictor.model, torch.from_numpy(far))[1].shape[1]
    scope = {"mean": np.ones(width, np.float32), "precision": np.eye(width, dtype=np.float32) * 1e6}
    predictor = dataclasses.replace(
        predictor, engine=dataclasses.replace(predictor.engine, scope=scope)
    )
    decided = predictor.decide_inputs(far, [[]])[0]
    assert decided.scope_distance > 5.0  # far from the training images, yet labelled
    assert decided.out_of_scope is False and decided.label is not None
    flagged = predictor.decide_inputs(far, [["a colour image"]])[0]
    assert flagged.out_of_scope is True and flagged.label is None
    assert flagged.scope_reason == "a colour image"


def test_what_load_model_refuses(model_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown backend 'gpu'"):
        load_model(model_file, backend="gpu")
    with pytest.raises(ConfigError, match="precision bf16 runs the torch model"):
        load_model(model_file, backend="onnx", precision="bf16")
    with pytest.raises(CheckpointError, match="no model file at"):
        load_model(tmp_path / "nothing")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable busdx model file"):
        load_model(tmp_path / "garbage.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a busdx model file"):
        load_model(tmp_path / "other.pt")
    info, tensors = read_model_file(model_file)
    misfit = {k: v[..., :1] for k, v in tensors["state_dict"].items()}
    write_model_file(tmp_path / "misfit.pt", info, state_dict=misfit)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(tmp_path / "misfit.pt")


def test_a_run_directory_loads_its_model_file_and_auto_falls_back_to_torch(model_file):
    predictor = load_model(
        model_file.parent, backend="auto", device="cpu"
    )  # no export: the torch model
    assert predictor.backend == "torch" and predictor.path == model_file
    assert predictor.class_names == ["benign", "malignant"]
    assert predictor.info.network["name"] == load_config().model.name
    assert predictor.model is not None
    assert not predictor.model.training  # ready for inference


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory):
    """A run folder with the tiny model.pt and its fp32 ONNX export, also copied as the
    'int8' file (same network: what is checked here is which file is chosen, and when)."""
    from busdx.workflows.export import export_onnx

    folder = tmp_path_factory.mktemp("exported")
    shutil.copyfile(model_file, folder / MODEL_FILE)
    export_onnx(load_model(folder), folder / ONNX_FILE)
    return folder


def test_the_onnx_backend_answers_as_the_torch_model(exported):
    torch_model, onnx_model = load_model(exported), load_model(exported, backend="onnx", threads=1)
    assert onnx_model.backend == "onnx" and onnx_model.path.name == ONNX_FILE
    assert onnx_model.engine.session.get_session_options().intra_op_num_threads == 1
    images = [_scan(5), _scan(6), _scan(7)]
    for a, b in zip(torch_model.decide_images(images), onnx_model.decide_images(images),
                    strict=True):  # fmt: skip
        assert b.probability == pytest.approx(a.probability, abs=1e-5) and a.label == b.label
    assert (onnx_model.threshold, onnx_model.temperature) == (THRESHOLD, T)


def test_which_file_each_backend_loads(exported, tmp_path, monkeypatch, caplog):
    folder = shutil.copytree(exported, tmp_path / "run")
    fp32 = load_model(folder, backend="auto", device="cpu")  # no int8 file yet: the fp32 export
    assert (fp32.backend, fp32.path.name) == ("onnx", ONNX_FILE)
    shutil.copyfile(folder / ONNX_FILE, folder / INT8_FILE)
    assert load_model(folder, backend="onnx").path.name == INT8_FILE  # int8 first
    with caplog.at_level(logging.INFO, logger="busdx"):
        auto = load_model(folder, backend="auto", device="cpu", threads=1)
    assert (auto.backend, auto.path.name) == ("onnx", INT8_FILE)
    assert f"using {INT8_FILE} (ONNX Runtime; --backend torch for the PyTorch model)" in caplog.text
    assert auto.engine.session.get_session_options().intra_op_num_threads == 1  # threads reach it
    assert load_model(folder, backend="auto", device="cpu").backend == "onnx"
    assert (
        load_model(folder / MODEL_FILE, backend="auto", device="cpu").backend == "onnx"
    )  # beside model.pt
    assert load_model(folder, backend="torch").backend == "torch"
    assert load_model(folder, backend="auto", precision="bf16").backend == "torch"
    monkeypatch.setattr(predictor_module, "cpu_has_vnni", lambda: False)
    auto = dataclasses.replace(auto, info=auto.info.replace(int8_weight_bits=8))  # 8-bit weights
    monkeypatch.setattr(predictor_module, "_load_onnx", lambda path, threads=None: auto)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="busdx"):
        assert load_model(folder, backend="auto", device="cpu").backend == "torch"
    assert f"{INT8_FILE} has 8-bit weights, which this CPU (no VNNI or AMX) can saturate; " \
        "passing it over" in caplog.text  # fmt: skip
    monkeypatch.setattr(predictor_module, "cpu_has_vnni", lambda: True)
    assert load_model(folder, backend="auto", device="cpu").backend == "onnx"


def test_a_stale_export_is_refused_or_passed_over(exported, tmp_path, caplog):
    folder = shutil.copytree(exported, tmp_path / "run")
    shutil.copyfile(folder / ONNX_FILE, folder / INT8_FILE)
    info, _ = read_model_file(folder / MODEL_FILE)
    update_model_file(folder / MODEL_FILE, info.replace(threshold=0.7))  # a recalibration
    with pytest.raises(CheckpointError, match=f"{INT8_FILE} was not exported from the model.pt"):
        load_model(folder, backend="onnx")
    with pytest.raises(CheckpointError, match=r"export again: busdx export --run .* --int8$"):
        load_model(folder / INT8_FILE)
    with pytest.raises(CheckpointError, match=re.escape(f"busdx export --run {folder}") + "$"):
        load_model(folder / ONNX_FILE)
    with caplog.at_level(logging.WARNING):
        assert load_model(folder, backend="auto", device="cpu").backend == "torch"
    assert f"{INT8_FILE} was not exported from the {MODEL_FILE} beside it" in caplog.text
    assert "; passing it over" in caplog.text
    alone = tmp_path / "deployment"
    alone.mkdir()
    shutil.copyfile(folder / ONNX_FILE, alone / ONNX_FILE)  # no model.pt to disagree with
    assert load_model(alone, backend="onnx").backend == "onnx"


def test_what_the_onnx_loader_refuses(tmp_path):
    with pytest.raises(CheckpointError, match=f"no {ONNX_FILE} in .*; export one first"):
        load_model(tmp_path, backend="onnx")
    with pytest.raises(CheckpointError, match="no ONNX model at"):
        load_model(tmp_path / "gone.onnx")
    (tmp_path / "fake.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is not an ONNX model exported by busdx"):
        load_model(tmp_path / "fake.onnx")


def test_an_ensemble_file_averages_its_members_logits(model_file, tmp_path):
    """A cross-fitted ensemble's model file: members' weights under ``members.<i>.``, one
    metadata; the logit is the mean of the members'. Training state never reaches metadata."""
    info, tensors = read_model_file(model_file)
    second = {key: value * 0.5 for key, value in tensors["state_dict"].items()}
    state = {f"members.0.{k}": v for k, v in tensors["state_dict"].items()}
    state |= {f"members.1.{k}": v for k, v in second.items()}
    write_model_file(tmp_path / "model.pt", info.replace(ensemble_size=2), state_dict=state)
    ensemble, single = load_model(tmp_path / "model.pt"), load_model(model_file)
    assert len(ensemble.model.members) == 2 and ensemble.info.ensemble_size == 2
    halved = load_model(model_file)
    halved.model.load_state_dict(second)
    inputs = torch.from_numpy(single.inputs([_scan(8)]))
    with torch.inference_mode():
        expected = (single.model(inputs) + halved.model(inputs)) / 2
        assert ensemble.model(inputs).item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_guarded_model_measures_each_input_and_flags_what_is_not_a_scan(model_file, tmp_path):
    from busdx.training.scope_fit import fit_scope

    predictor = load_model(model_file)
    images = [_scan(seed) for seed in range(10, 22)]
    files = [tmp_path / f"scan{i}.png" for i in range(len(images))]
    for image, file in zip(images, files, strict=True):
        image.save(file)
    guard, arrays = fit_scope(predictor.model, predictor.preprocessing, files[:8], files[8:],
                              device=torch.device("cpu"))  # fmt: skip
    shutil.copyfile(model_file, tmp_path / "model.pt")
    update_model_file(tmp_path / "model.pt", predictor.info.replace(scope=guard),
                      scope_arrays=arrays)  # fmt: skip
    guarded = load_model(tmp_path / "model.pt")
    assert guarded.engine.scope["precision"].dtype == np.float32  # upcast once
    assert guarded.info.scope == guard
    big = [image.resize((200, 200)) for image in images[8:]]  # pass the pixel checks
    flat = Image.new("RGB", (200, 200), (128, 128, 128))
    decisions = guarded.decide_images([*big, flat], threshold=0.0)
    # out of scope: the probability and the reason, no label; else the threshold given is used
    assert [d.label for d in decisions] == [None if d.out_of_scope else "malignant"
                                            for d in decisions]  # fmt: skip
    labelled = guarded.decide_images([*big, flat], threshold=0.0, label_out_of_scope=True)
    assert all(d.label == "malignant" for d in labelled)
    for decision in decisions[:-1]:  # measured and reported; a scan is never flagged for it
        assert decision.scope_distance is not None and decision.scope_distance > 0
        assert decision.out_of_scope is False and decision.scope_reason is None
    assert decisions[-1].out_of_scope is True and "uniform" in decisions[-1].scope_reason
    default = guarded.decide_images(big[:1])[0]
    assert default.label == ("malignant" if default.probability >= THRESHOLD else "benign")
    assert default.scope_distance == pytest.approx(decisions[0].scope_distance, rel=1e-4)


def test_the_onnx_session_runs_on_the_given_threads_without_spinning(exported, caplog):
    before = torch.get_num_threads()
    try:
        loaded = load_model(exported, backend="onnx", threads=2)
        options = loaded.engine.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert loaded.engine.session.get_providers() == ["CPUExecutionProvider"]
        assert torch.get_num_threads() == before  # ONNX Runtime leaves torch's threads alone
    finally:
        torch.set_num_threads(before)
