"""Every model file this project ships or writes reads into one typed schema (issue 29): the
bundled model's model.pt and the metadata of its ONNX exports, and a freshly trained file."""

import json

import onnx
import pytest
import torch

from busdx.bundled import resolve_run
from busdx.model_file import ModelInfo, read_info


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
    with pytest.raises(ValueError, match="extra"):
        read_info({**metadata, "from_the_future": 1})
    with pytest.raises(ValueError, match="not a busdx model file"):
        read_info({**metadata, "format": "other"})
    uncalibrated = {k: v for k, v in metadata.items() if k not in {
        "temperature", "threshold_policy", "sensitivity_promise", "operating_points",
        "target_sensitivity", "threshold_confidence", "calibration_cases", "validation_ece",
        "calibration_source"}}  # fmt: skip
    assert not read_info(uncalibrated).calibrated and read_info(uncalibrated).temperature == 1.0
