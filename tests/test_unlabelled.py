"""busdx adapt: BatchNorm statistics re-estimated on a site's unlabelled images, in a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from busdx.cli import main
from busdx.data.synthetic import write_synthetic_dataset
from busdx.inference.model_file import read_model_file
from busdx.inference.predictor import load_model
from busdx.workflows.adapt import adapt_batchnorm

from conftest import FAST, train_run


@pytest.fixture(scope="module")
def lite_run(synthetic_data, tmp_path_factory):
    """A small EfficientNet-Lite0 run: a network with BatchNorm layers."""
    out = tmp_path_factory.mktemp("lite") / "run"
    return train_run(synthetic_data, out, "--recipe", "efficientnet-lite0", *FAST, epochs=1)


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_adapting_moves_the_statistics_by_the_blend_and_leaves_the_weights(lite_run, tmp_path):
    site = write_synthetic_dataset(tmp_path / "site", n_per_class=4, seed=9)
    files = sorted(site.rglob("*.png"))
    trained = load_model(lite_run, device="cpu")
    weights = {k: v.clone() for k, v in trained.model.state_dict().items() if "running" not in k
               and "num_batches" not in k}  # fmt: skip
    full, half, none = (load_model(lite_run, device="cpu") for _ in range(3))
    assert adapt_batchnorm(full, files, blend=1.0, progress=False) > 0
    adapt_batchnorm(half, files, blend=0.5, progress=False)
    adapt_batchnorm(none, files, blend=0.0, progress=False)
    for t, f, h, n in zip(_stats(trained.model), _stats(full.model), _stats(half.model),
                          _stats(none.model), strict=True):  # fmt: skip
        assert torch.allclose(n, t)
        assert torch.allclose(h, (t + f) / 2, atol=1e-5)
    assert not all(torch.allclose(t, f) for t, f in zip(_stats(trained.model), _stats(full.model),
                                                        strict=True))  # fmt: skip
    after = full.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert not full.model.training


def test_busdx_adapt_writes_a_copy_and_leaves_the_run(lite_run, trained_run, tmp_path, capsys):
    site = write_synthetic_dataset(tmp_path / "site", n_per_class=3, seed=11)
    before = (lite_run / "model.pt").read_bytes()
    out = tmp_path / "adapted"
    assert main(["adapt", "--run", str(lite_run), "--data", str(site), "--out", str(out),
                 "--blend", "0.5", "--no-progress"]) == 0  # fmt: skip
    assert "new run:" in capsys.readouterr().out
    assert (lite_run / "model.pt").read_bytes() == before
    adaptation = read_model_file(out / "model.pt")[0].provenance.adaptation
    assert adaptation["blend"] == 0.5 and adaptation["images"] == 6
    assert (
        main(
            [
                "adapt",
                "--run",
                str(lite_run),
                "--data",
                str(site),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )  # an existing run directory is refused
    assert main(["adapt", "--run", str(lite_run), "--data", str(site), "--out",
                 str(tmp_path / "x"), "--blend", "2", "--no-progress"]) == 2  # fmt: skip
    assert (
        main(
            [
                "adapt",
                "--run",
                str(trained_run),
                "--data",
                str(site),
                "--out",
                str(tmp_path / "y"),
                "--no-progress",
            ]
        )
        == 2
    )  # VGG16: no BatchNorm to adapt
    assert "no BatchNorm layer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-made
