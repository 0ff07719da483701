import math

import pytest
import torch

from busdx.config import apply_overrides, load_config
from busdx.errors import ConfigError
from busdx.inference.model_file import read_model_file
from busdx.layout import LAST_FILE, MODEL_FILE
from busdx.runs import prepare_dataset
from busdx.training.loop import fit

FAST = [
    "data.image_size=32",
    "model.weights=none",
    "train.batch_size=8",
    "train.epochs=3",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
]


def _setup(synthetic_data, *extra):
    config = apply_overrides(load_config(), [*FAST, *extra])
    return config, prepare_dataset(config, synthetic_data)


@pytest.mark.parametrize("extra", [[], ["train.ema_epochs=1"]], ids=["plain", "ema"])
def test_resume_after_interruption_continues_exactly(synthetic_data, tmp_path, extra):
    config, dataset = _setup(synthetic_data, *extra)
    straight = fit(config, dataset, tmp_path / "straight", progress=False)

    short = apply_overrides(config, ["train.epochs=1"])
    fit(short, dataset, tmp_path / "resumed", progress=False)  # "killed" after epoch 1
    resumed = fit(config, dataset, tmp_path / "resumed", progress=False)

    assert [r.epoch for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert (a.train_loss, a.val_loss) == (b.train_loss, b.val_loss)
    final = [
        read_model_file(d / LAST_FILE)[1]["state_dict"]
        for d in (tmp_path / "straight", tmp_path / "resumed")
    ]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key])


def test_the_weights_average_is_validated_and_saved_as_the_model(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data, "train.ema_epochs=1", "train.epochs=1")
    (record,) = fit(config, dataset, tmp_path, progress=False)
    last = read_model_file(tmp_path / LAST_FILE)[1]
    info, saved = read_model_file(tmp_path / MODEL_FILE)
    steps = math.ceil(len(dataset.subset("train")) / config.train.batch_size)
    assert int(last["ema"]["n_averaged"]) == steps > 1
    average = {k.removeprefix("module."): v for k, v in last["ema"].items() if k != "n_averaged"}
    assert average.keys() == saved["state_dict"].keys()
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in average.items())
    assert info.provenance.val_loss == record.val_loss  # the average was validated
    raw = last["state_dict"]  # the last step's weights, which training resumes from
    assert any(not torch.equal(raw[k], v) for k, v in average.items() if v.is_floating_point())


def test_model_file_carries_its_metadata(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data, "train.epochs=1")
    fit(config, dataset, tmp_path, progress=False)
    payload = torch.load(tmp_path / MODEL_FILE, weights_only=True)  # safe loading works
    assert (payload["format"], payload["format_version"]) == ("busdx-model", 2)
    info = read_model_file(tmp_path / MODEL_FILE)[0]
    assert info.class_names == ("benign", "malignant") and not info.calibrated
    assert info.preprocessing.mean == (123.68, 116.779, 103.939)
    assert info.provenance.weights == {"name": "none", "sha256": None}
    assert info.provenance.config["train"]["epochs"] == 1 and info.provenance.busdx_version
    assert (tmp_path / "history.csv").read_text().startswith("epoch,train_loss,train_accuracy")


def test_early_stopping_stops_patience_epochs_after_the_best_and_keeps_the_best(
    synthetic_data, tmp_path
):
    patience = 2
    config, dataset = _setup(
        synthetic_data, "train.epochs=30", f"train.early_stopping_patience={patience}"
    )
    history = fit(config, dataset, tmp_path, progress=False)
    losses = [record.val_loss for record in history]
    best = losses.index(min(losses))
    assert len(history) == best + 1 + patience < 30  # no improvement in exactly `patience` epochs
    saved = read_model_file(tmp_path / MODEL_FILE)[0].provenance
    assert saved.epoch == history[best].epoch and saved.val_loss == min(losses)


def test_atomic_files_get_normal_permissions(tmp_path):
    from busdx.fileio import atomic_write_text

    atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").stat().st_mode & 0o044 == 0o044  # group/other can read


def test_results_do_not_depend_on_loader_workers_or_the_memory_cache(synthetic_data, tmp_path):
    """Augmentation is seeded per (epoch, image) and dropout never shares the loaders' random
    stream: 0 workers, 2 workers, and 2 workers reading from disk every epoch train the same
    model (dropout 0.5, full augmentation)."""
    runs = {}
    for name, settings in {
        "main-process": ["data.num_workers=0"],
        "two-workers": ["data.num_workers=2"],
        "two-workers-from-disk": ["data.num_workers=2", "data.memory_cache_mb=0"],
    }.items():
        config, dataset = _setup(synthetic_data, *settings)
        runs[name] = [(r.train_loss, r.val_loss) for r in fit(config, dataset, tmp_path / name,
                                                              progress=False)]  # fmt: skip
    assert runs["main-process"] == runs["two-workers"] == runs["two-workers-from-disk"]


def test_bf16_training_runs_and_learns_like_fp32(synthetic_data, tmp_path):
    """bf16 autocast on a CPU: finite losses close to the fp32 run's (bf16 keeps 8 bits of
    mantissa, so not equal)."""
    histories = {}
    for precision in ("fp32", "bf16"):
        config, dataset = _setup(synthetic_data, f"train.precision={precision}")
        histories[precision] = fit(config, dataset, tmp_path / precision, progress=False)
    for a, b in zip(histories["fp32"], histories["bf16"], strict=True):
        assert abs(a.train_loss - b.train_loss) < 0.1 * a.train_loss
        assert abs(a.val_loss - b.val_loss) < 0.1 * a.val_loss
    saved = read_model_file(tmp_path / "bf16" / MODEL_FILE)[0].provenance
    assert saved.config["train"]["precision"] == "bf16"


def test_fp16_on_a_cpu_is_refused_with_advice(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data, "train.precision=fp16", "train.device=cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device; use bf16"):
        fit(config, dataset, tmp_path, progress=False)


def test_keep_last_saves_the_last_epoch_whatever_its_validation_loss(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data, "train.epochs=4", "train.keep=last")
    history = fit(config, dataset, tmp_path, progress=False)
    info, saved = read_model_file(tmp_path / MODEL_FILE)
    last = read_model_file(tmp_path / LAST_FILE)[1]
    assert info.provenance.epoch == history[-1].epoch == 4
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in last["state_dict"].items())
