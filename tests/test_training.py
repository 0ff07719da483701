import torch

from busdx.config import apply_overrides, load_config
from busdx.runs import prepare_dataset
from busdx.training import LAST_FILE, MODEL_FILE, fit

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


def test_resume_after_interruption_continues_exactly(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data)
    straight = fit(config, dataset, tmp_path / "straight", progress=False)

    short = apply_overrides(config, ["train.epochs=1"])
    fit(short, dataset, tmp_path / "resumed", progress=False)  # "killed" after epoch 1
    resumed = fit(config, dataset, tmp_path / "resumed", progress=False)

    assert [r.epoch for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert (a.train_loss, a.val_loss) == (b.train_loss, b.val_loss)
    final = [
        torch.load(d / LAST_FILE, weights_only=True)["state_dict"]
        for d in (tmp_path / "straight", tmp_path / "resumed")
    ]
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key])


def test_model_file_carries_its_metadata(synthetic_data, tmp_path):
    config, dataset = _setup(synthetic_data, "train.epochs=1")
    fit(config, dataset, tmp_path, progress=False)
    payload = torch.load(tmp_path / MODEL_FILE, weights_only=True)  # safe loading works
    assert payload["format"] == "busdx-model" and payload["class_names"] == ["benign", "malignant"]
    assert payload["preprocessing"]["mean"] == [123.68, 116.779, 103.939]
    assert payload["weights"] == {"name": "none", "sha256": None}
    assert payload["config"]["train"]["epochs"] == 1 and payload["busdx_version"]
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
    saved = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert saved["epoch"] == history[best].epoch and saved["val_loss"] == min(losses)


def test_atomic_files_get_normal_permissions(tmp_path):
    from busdx.fileio import atomic_write_text

    atomic_write_text(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").stat().st_mode & 0o044 == 0o044  # group/other can read
