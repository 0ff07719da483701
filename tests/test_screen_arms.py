"""The lever screen's arms (experiments/screen_loso.py) are valid configurations: an arm that
busdx would refuse fails here, not half an hour into a screen."""

import importlib.util
from pathlib import Path

import pytest

from busdx.config import apply_overrides, load_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "screen_loso.py"
spec = importlib.util.spec_from_file_location("screen_loso", SCRIPT)
screen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screen)


@pytest.mark.parametrize("arm", sorted(screen.ARMS))
def test_every_arm_is_a_configuration_busdx_accepts(arm):
    pairs = zip(screen.BASE[:-1], screen.BASE[1:], strict=True)
    base = [value for flag, value in pairs if flag == "--set"]
    config = apply_overrides(load_config(recipe="efficientnet-lite0"), base + screen.ARMS[arm])
    assert config.train.epochs >= 8 and config.data.test_fraction == 0


def test_an_arm_is_paired_with_the_baseline_kept_the_same_way():
    assert screen.reference_arm("baseline") is None
    assert screen.reference_arm("mask@last") == "baseline@last"
    assert screen.reference_arm("mask") == "baseline"
    assert screen.reference_arm("mask@last:flip") == "mask@last"
