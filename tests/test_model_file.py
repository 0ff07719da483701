"""Every model file this project ships or writes reads into one typed schema (issue 29): the
bundled model's model.pt and the metadata of its ONNX exports, and a freshly trained file."""

import json

import onnx
import pytest
import torch

from busdx.bundled import resolve_run
from busdx.errors import CheckpointError
from busdx.inference.model_file import ModelInfo, read_info, read_model_file, update_model_file
from busdx.stats.calibration import Calibration


def _onnx_metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["busdx"])


@pytest.mark.parametrize("name", ["model.pt", "model.onnx", "model.int8.onnx"])
def test_every_committed_model_file_reads(name):
    path = resolve_run(None) / name
    if not path.is_file():
        pytest.skip(f"{name} does not ship")
    if name == "model.pt":
        metadata = torch.load(path, map_location="cpu", weights_only=True)
    else:
        metadata = _onnx_metadata(path)
    info = read_info(metadata)
    assert isinstance(info, ModelInfo) and info.class_names == ("benign", "malignant")
    assert info.calibrated and info.temperature == pytest.approx(1.424, abs=1e-3)
    assert info.calibration.source.startswith("out-of-site predictions")
    assert info.outlines and info.scope is not None and info.scope.threshold > 0
    assert info.preprocessing.image_size == 224
    if name != "model.pt":
        assert info.provenance.exported_from["file"] == "model.pt"


def test_an_unknown_key_or_another_format_is_refused():
    metadata = torch.load(resolve_run(None) / "model.pt", map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="from_the_future: Extra inputs are not permitted"):
        read_info({**metadata, "from_the_future": 1})
    with pytest.raises(CheckpointError, match="not a busdx model file"):
        read_info({**metadata, "format": "other"})
    with pytest.raises(CheckpointError, match="format version 3 is not one this busdx reads"):
        read_info({**metadata, "format_version": 3})
    uncalibrated = {k: v for k, v in metadata.items() if k not in {
        "temperature", "threshold_policy", "sensitivity_promise", "operating_points",
        "target_sensitivity", "threshold_confidence", "calibration_cases", "validation_ece",
        "calibration_source"}}  # fmt: skip
    assert not read_info(uncalibrated).calibrated and read_info(uncalibrated).temperature == 1.0


def test_an_old_file_is_rewritten_in_the_current_format_and_reads_the_same(tmp_path):
    """busdx calibrate or adapt on a version-1 file (the bundled model) writes version 2: the
    same information, its guard's arrays moved beside the weights, nothing lost."""
    old = resolve_run(None) / "model.pt"
    info, tensors = read_model_file(old)
    copy = tmp_path / "model.pt"
    copy.write_bytes(old.read_bytes())
    update_model_file(copy, info)
    payload = torch.load(copy, map_location="cpu", weights_only=True)
    assert payload["format_version"] == 2 and set(payload) == {
        "format", "format_version", "info", "state_dict", "scope_arrays"}  # fmt: skip
    again, moved = read_model_file(copy)
    assert again == info
    assert torch.equal(moved["scope_arrays"]["precision"], tensors["scope_arrays"]["precision"])
    assert moved["state_dict"].keys() == tensors["state_dict"].keys()


def test_calibrating_replaces_the_threshold_and_the_whole_calibration():
    info = read_model_file(resolve_run(None) / "model.pt")[0]
    fitted = Calibration(threshold=0.3, temperature=2.0, threshold_policy="youden",
                         source="site x: 40 labelled cases")  # fmt: skip
    local = info.calibrated_with(fitted)
    assert (local.threshold, local.temperature) == (0.3, 2.0)
    assert local.calibration.source == "site x: 40 labelled cases"
    assert local.calibration.sensitivity_promise is None  # the old promise does not carry over
    assert local.calibration.promised_sensitivity is None and local.scope == info.scope
    with pytest.raises(ValueError, match="frozen"):
        local.threshold = 0.5
