"""Weights lookup, checksums and the Keras-release download path (run offline via file://)."""

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from busdx.errors import WeightsError
from busdx.networks.weights import (
    content_sha256,
    convert_keras_vgg16_h5,
    get_weight_spec,
    load_state_dict,
    resolve_weights_file,
)

from conftest import WEIGHTS_DIR, needs_shared

SPEC = get_weight_spec("vgg16", "imagenet")
KERAS_NAMES = ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1",
               "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3",
               "block5_conv1", "block5_conv2", "block5_conv3"]  # fmt: skip


def _write_keras_h5(state, path):
    """Lay out a torchvision-keyed RGB state_dict the way Keras stores VGG16 (HWIO, BGR)."""
    indices = sorted({int(k.split(".")[0]) for k in state})
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"input_1", *[n.encode() for n in KERAS_NAMES]]
        for name, index in zip(KERAS_NAMES, indices, strict=True):
            kernel = state[f"{index}.weight"]
            if index == 0:
                kernel = kernel.flip(1)
            group = handle.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group[f"{name}/kernel:0"] = kernel.permute(2, 3, 1, 0).numpy()
            group[f"{name}/bias:0"] = state[f"{index}.bias"].numpy()


@needs_shared(WEIGHTS_DIR)
def test_shared_file_matches_the_published_tensor_hash():
    assert content_sha256(load_state_dict(WEIGHTS_DIR / SPEC.filename)) == SPEC.content_sha256


@needs_shared(WEIGHTS_DIR)
def test_keras_release_converts_to_the_exact_published_weights(tmp_path):
    state = load_state_dict(WEIGHTS_DIR / SPEC.filename)
    _write_keras_h5(state, tmp_path / "keras.h5")
    assert content_sha256(convert_keras_vgg16_h5(tmp_path / "keras.h5")) == SPEC.content_sha256


@needs_shared(WEIGHTS_DIR)
def test_download_converts_verifies_and_caches(tmp_path, monkeypatch):
    _write_keras_h5(load_state_dict(WEIGHTS_DIR / SPEC.filename), tmp_path / "keras.h5")
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path / "nothing-here"))
    spec = dataclasses.replace(SPEC, url=(tmp_path / "keras.h5").as_uri())
    path = resolve_weights_file(spec)
    assert path.parent == tmp_path / "cache" / "busdx" / "weights"
    assert content_sha256(load_state_dict(path)) == SPEC.content_sha256
    assert resolve_weights_file(spec, download=False) == path  # found in the cache next time


def test_download_of_wrong_weights_is_rejected_and_leaves_nothing(tmp_path, monkeypatch):
    state = {f"{i}.weight": torch.zeros(1) for i in (0,)}
    torch.save(state, tmp_path / "bad.pth")
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path / "nothing-here"))
    spec = dataclasses.replace(SPEC, url=(tmp_path / "bad.pth").as_uri(), url_format="pth")
    with pytest.raises(WeightsError, match="does not hold"):
        resolve_weights_file(spec)
    assert not list((tmp_path / "cache" / "busdx" / "weights").glob("*"))


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path / "nothing-here"))
    spec = dataclasses.replace(SPEC, url=(tmp_path / "missing.h5").as_uri())
    with pytest.raises(WeightsError, match=r"could not download .* put vgg16_features"):
        resolve_weights_file(spec)


def test_non_state_dict_files_are_refused(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a loadable"):
        load_state_dict(tmp_path / "x.pth")
    torch.save({"a": np.arange(3).tolist()}, tmp_path / "y.pth")
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        load_state_dict(tmp_path / "y.pth")
