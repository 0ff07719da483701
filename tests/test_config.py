import pytest
import yaml

from busdx.config import apply_overrides, config_from_dict, list_recipes, load_config
from busdx.errors import ConfigError


def test_default_recipe_is_the_classic_vgg16_recipe():
    config = load_config()
    assert config.recipe == "vgg16-frozen" and "vgg16-frozen" in list_recipes()
    assert (config.model.name, config.model.weights, config.model.freeze_backbone) == (
        "vgg16",
        "imagenet",
        True,
    )
    assert (config.model.hidden_units, config.model.dropout) == (512, 0.5)
    assert (config.train.epochs, config.train.batch_size, config.train.lr) == (30, 32, 1e-3)
    assert config.data.image_size == 224
    assert config.augment.horizontal_flip and config.augment.rotation_degrees == 20


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 5, "lr": 0.01}}))
    config = apply_overrides(load_config(path), ["train.epochs=7", "augment.zoom=0.1"])
    assert (config.train.epochs, config.train.lr, config.augment.zoom) == (7, 0.01, 0.1)
    assert config.train.batch_size == 32  # untouched default from the recipe


def test_resolved_config_round_trips():
    config = apply_overrides(load_config(), ["data.classes=[a, b]", "data.positive_class=b"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "Did you mean 'epochs'"),
        ("train.epochs=three", "must be an integer"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("data.image_size=100", "multiple of 32"),
        ("data.positive_class=cancer", "must be the last of"),
        ("nonsense", "section.key=value"),
        ("model.freeze_backbone=maybe", "true or false"),
        ("train.precision=fp8", "train.precision must be fp32, bf16 or fp16"),
        ("data.num_workers=-2", "data.num_workers must be >= 0"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config(), [override])


def test_unknown_recipe_lists_available():
    recipes = "efficientnet-lite0, vgg16-finetune, vgg16-frozen"
    with pytest.raises(ConfigError, match=f"available: {recipes}"):
        load_config(recipe="resnet-magic")


def test_set_reaches_every_key_of_every_section():
    """``--set section.key=value`` for each of the config's keys, with its default written as
    text (as a shell passes it), gives back the same config; a changed value takes effect."""
    import json

    from busdx.config import KEYS

    config = load_config()
    defaults = config.to_dict()
    assert set(KEYS) == {"model", "data", "augment", "train", "evaluate"}
    for section, keys in KEYS.items():
        assert set(keys) == set(defaults[section])  # KEYS lists them all
        for key in keys:
            text = json.dumps(defaults[section][key])
            assert apply_overrides(config, [f"{section}.{key}={text}"]) == config, key
    changed = apply_overrides(config, ["augment.gamma=0.3", "evaluate.ci_level=0.9"])
    assert (changed.augment.gamma, changed.evaluate.ci_level) == (0.3, 0.9)
    assert config.augment.gamma == 0.0  # the original is untouched


def test_each_default_is_written_once():
    """The classic recipe's file names itself and nothing else: its values are the models'."""
    from importlib import resources

    text = (resources.files("busdx") / "configs" / "vgg16-frozen.yaml").read_text("utf-8")
    assert yaml.safe_load(text) == {"recipe": "vgg16-frozen"}
