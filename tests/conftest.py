"""Shared fixtures: small synthetic datasets and the location of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from busdx.data.synthetic import write_synthetic_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# BUSDX_TEST_WEIGHTS_DIR=/empty/folder runs the suite as on a machine without ../shared/weights
WEIGHTS_DIR = Path(os.environ.get("BUSDX_TEST_WEIGHTS_DIR", SHARED / "weights"))
BUSI_DIR = SHARED / "data" / "busi"
os.environ["BUSDX_WEIGHTS_DIR"] = str(WEIGHTS_DIR)  # also for module-scoped fixtures
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: share the cores, not fight
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )


@pytest.fixture(autouse=True)
def _weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point busdx at ../shared/weights and keep the user cache out of the tests."""
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(WEIGHTS_DIR))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_download = torch.hub.download_url_to_file

    def local_only(url: str, *args, **kwargs):
        if not url.startswith("file:"):
            raise OSError(f"tests never touch the network (asked for {url})")
        return real_download(url, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", local_only)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 benign + 12 malignant generated images in the class-folder layout (read-only use)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_per_class=12, seed=1)


@pytest.fixture(scope="session")
def masked_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic images of :func:`synthetic_data` with a lesion mask beside each."""
    root = tmp_path_factory.mktemp("masked")
    return write_synthetic_dataset(root, n_per_class=12, seed=1, masks=True)


@pytest.fixture(scope="session")
def roi_run(masked_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained in ROI mode (data.region: box) on the masks' boxes, 64 px input."""
    options = [arg for arg in FAST if arg not in {"--image-size", "32"}] + ["--image-size", "64"]
    out = tmp_path_factory.mktemp("roi") / "run"
    return train_run(masked_data, out, *options, "--set", "data.region=box", epochs=1)


@pytest.fixture(scope="session")
def mask_run(masked_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with a mask head (EfficientNet-Lite0, random initial weights, 64 px input),
    trained for 2 epochs on the synthetic lesions and their masks."""
    options = [arg for arg in FAST if arg not in {"--image-size", "32"}] + ["--image-size", "64"]
    options += ["--recipe", "efficientnet-lite0", "--set", "model.mask_head=true"]
    return train_run(masked_data, tmp_path_factory.mktemp("mask") / "run", *options)


@pytest.fixture(scope="session")
def backbone_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """VGG16 backbone weights for tests that need *some* fixed pretrained weights (the feature
    cache, exports): ``imagenet`` where ../shared/weights has them, else a file of seeded random
    weights, so that these tests run on any machine instead of being skipped."""
    if (WEIGHTS_DIR / "vgg16_features_imagenet_rgb.pth").is_file():
        return "imagenet"
    from torchvision.models import vgg16

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16_random.pth"
    torch.save(vgg16(weights=None).features.state_dict(), path)
    return str(path)


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")


# Small and fast: a 32x32 input gives VGG16 a 1x1x512 feature map; 100 bootstrap resamples
# (the least busdx accepts) instead of 1,000: the CIs of 6 test images mean nothing anyway.
FAST = ["--image-size", "32", "--weights", "none", "--batch-size", "8", "--no-progress",
        "--set", "evaluate.n_bootstrap=100"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small trained run (FAST, 2 epochs) with its fp32 ONNX export, shared by every test
    that only reads a run; a test that changes a run works on a copy (shutil.copytree)."""
    from busdx.workflows.export import export_run

    run = train_run(synthetic_data, tmp_path_factory.mktemp("shared-run") / "run", *FAST)
    export_run(run)
    return run


def train_run(data: Path, out: Path, *options: str, epochs: int = 2) -> Path:
    """``busdx train`` on ``data`` with a 50/25/25 split; returns the run directory."""
    from busdx.cli import main

    split = ["--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25"]
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *split]
    args += options
    assert main(args) == 0
    return out


FLOAT_COLUMNS = ("probability_malignant", "logit", "scope_distance")


def assert_same_rows(first: list[dict], second: list[dict], tolerance: float = 1e-5) -> None:
    """Prediction rows equal as text, except numbers that a model computed: those may differ by
    float noise (batch composition, threads and CPU kernels change the last digits)."""
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in FLOAT_COLUMNS and a[key] and b[key]:
                assert abs(float(a[key]) - float(b[key])) <= tolerance, (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)
