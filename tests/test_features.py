"""Feature cache: hits, misses, invalidation, determinism, kill safety, and training on it."""

import numpy as np
import pytest
import torch

from busdx.config import AugmentConfig, ModelConfig, apply_overrides, load_config
from busdx.data.datasets import scan_dataset
from busdx.data.imaging import load_image
from busdx.inference.model_file import read_model_file
from busdx.networks.classifier import create_model
from busdx.runs import prepare_dataset
from busdx.training.feature_cache import FeatureCache
from busdx.training.loop import fit
from busdx.training.transforms import build_eval_transform


@pytest.fixture(scope="module")
def model_and_prep(backbone_weights):
    model, info, prep = create_model(ModelConfig(weights=backbone_weights), image_size=32)
    return model, info, prep


@pytest.fixture
def samples(synthetic_data):
    return scan_dataset(synthetic_data, ["benign", "malignant"]).samples[:6]


def _cache(model_and_prep, root, **augment):
    _, info, prep = model_and_prep
    return FeatureCache(model_name="vgg16", weights_sha256=info.sha256, preprocessing=prep,
                        augment=AugmentConfig(**augment), seed=0, root=root)  # fmt: skip


def test_hit_miss_and_invalidation(model_and_prep, samples, tmp_path):
    model = model_and_prep[0]
    cache = _cache(model_and_prep, tmp_path)
    cpu = torch.device("cpu")
    assert cache.fill(model, samples, [0, 1, 2], device=cpu, progress=False) == 18
    assert cache.fill(model, samples, [0, 1, 2], device=cpu, progress=False) == 0
    other_augment = _cache(model_and_prep, tmp_path, zoom=0.1)
    # the plain view is shared; augmented views depend on the augmentation settings
    assert other_augment.fill(model, samples, [0, 1, 2], device=cpu, progress=False) == 12
    plain, augmented = cache.load(samples[0], 0), cache.load(samples[0], 1)
    image = build_eval_transform(model_and_prep[2])(load_image(samples[0].path))
    with torch.inference_mode():
        direct = model.features(image[None])[0].numpy()
    np.testing.assert_allclose(plain, direct, rtol=1e-5, atol=1e-4)  # the cache holds the truth
    assert plain.shape == (512, 1, 1) and not np.array_equal(plain, augmented)
    assert not np.array_equal(augmented, other_augment.load(samples[0], 1))


def test_views_are_deterministic_across_caches(model_and_prep, samples, tmp_path):
    model, cpu = model_and_prep[0], torch.device("cpu")
    first, second = _cache(model_and_prep, tmp_path / "a"), _cache(model_and_prep, tmp_path / "b")
    first.fill(model, samples, [1, 2], device=cpu, progress=False)
    second.fill(model, list(reversed(samples)), [2, 1], device=cpu, batch_size=4, progress=False)
    for sample in samples:
        np.testing.assert_allclose(first.load(sample, 2), second.load(sample, 2), rtol=1e-5)


def test_a_kill_mid_write_leaves_no_entry(model_and_prep, samples, tmp_path, monkeypatch):
    model, cpu = model_and_prep[0], torch.device("cpu")
    cache = _cache(model_and_prep, tmp_path)

    def dying_save(handle, array):
        handle.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(model, samples[:1], [0], device=cpu, progress=False)
    monkeypatch.undo()
    assert not list(tmp_path.rglob("*.npy"))
    assert cache.fill(model, samples[:1], [0], device=cpu, progress=False) == 1


def test_training_on_cached_features_learns_and_resumes(
    synthetic_data, tmp_path, monkeypatch, backbone_weights
):
    monkeypatch.setenv("BUSDX_CACHE_DIR", str(tmp_path / "cache"))
    config = apply_overrides(load_config(), [
        f"model.weights={backbone_weights}", "data.image_size=64", "train.feature_cache=true",
        "train.cache_views=2", "train.epochs=8", "train.batch_size=8", "data.val_fraction=0.25",
        "data.test_fraction=0.25"])  # fmt: skip
    dataset = prepare_dataset(config, synthetic_data)
    history = fit(config, dataset, tmp_path / "run", progress=False)
    if backbone_weights == "imagenet":  # random features are not expected to separate lesions
        assert history[-1].train_accuracy >= 0.9
        assert history[-1].train_loss < history[0].train_loss
    entries = len(list((tmp_path / "cache").rglob("*.npy")))
    assert entries == 12 * 2 + 6  # 12 training images x 2 views + 6 validation images
    short = apply_overrides(config, ["train.epochs=2"])
    fit(short, dataset, tmp_path / "resumed", progress=False)
    resumed = fit(config, dataset, tmp_path / "resumed", progress=False)
    assert [r.val_loss for r in resumed] == [r.val_loss for r in history]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == entries  # all hits


def test_cache_needs_pretrained_frozen_backbone():
    with pytest.raises(ValueError, match="frozen backbone with pretrained weights"):
        apply_overrides(load_config(), ["train.feature_cache=true", "model.weights=none"])


def test_finetune_recipe_caches_the_input_of_its_last_block(
    synthetic_data, tmp_path, monkeypatch, backbone_weights
):
    monkeypatch.setenv("BUSDX_CACHE_DIR", str(tmp_path / "cache"))
    overrides = [f"model.weights={backbone_weights}", "data.image_size=64",
                 "train.cache_views=2", "train.epochs=3", "train.batch_size=8",
                 "data.val_fraction=0.25", "data.test_fraction=0.25"]  # fmt: skip
    finetune = apply_overrides(load_config(recipe="vgg16-finetune"), overrides)
    dataset = prepare_dataset(finetune, synthetic_data)
    fit(finetune, dataset, tmp_path / "finetune", progress=False)
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 12 * 2 + 6
    assert {np.load(e).shape for e in entries} == {(512, 4, 4)}  # pool4 output, not pool5

    model, _, _ = create_model(finetune.model, image_size=64, load_weights=False)
    state = read_model_file(tmp_path / "finetune" / "model.pt")[1]["state_dict"]
    model.load_state_dict(state)
    initial, _, _ = create_model(finetune.model, image_size=64)
    block5_moved = not torch.equal(model.backbone[24].weight, initial.backbone[24].weight)
    stem_kept = torch.equal(model.backbone[0].weight, initial.backbone[0].weight)
    assert block5_moved and stem_kept

    frozen = apply_overrides(load_config(), [*overrides, "train.feature_cache=true"])
    fit(frozen, dataset, tmp_path / "frozen", progress=False)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2 * len(entries)  # own folder
