"""Lesion measurements on synthetic shapes with known answers, the likelihood categories and
the agreement statistics."""

import math

import numpy as np
import pytest

from busdx.lesion.descriptors import describe_lesion, largest_region, lesion_fields
from busdx.stats.agreement import (
    binomial_interval,
    cohen_kappa,
    confusion_table,
    dice,
    iou,
    kappa_with_ci,
)
from busdx.stats.likelihood import LIKELIHOOD_RANGES, category_table, likelihood_category

H, W = 240, 320
YY, XX = np.mgrid[0:H, 0:W]


def ellipse(cx, cy, a, b, angle=0.0):
    """Pixels inside the ellipse of semi-axes a (along ``angle``) and b."""
    c, s = math.cos(angle), math.sin(angle)
    x, y = XX + 0.5 - cx, YY + 0.5 - cy
    return ((x * c + y * s) / a) ** 2 + ((-x * s + y * c) / b) ** 2 <= 1


def star(cx, cy, radius, spikes=12, depth=0.35):
    angle, r = np.arctan2(YY - cy, XX - cx), np.hypot(XX - cx, YY - cy)
    return r <= radius * (1 + depth * np.maximum(0, np.cos(spikes * angle)) ** 8)


@pytest.mark.parametrize("angle", [0.0, 0.5, 1.2])
def test_an_ellipse_measures_its_two_diameters_whatever_its_tilt(angle):
    lesion = describe_lesion(ellipse(160, 120, 60, 25, angle))
    assert lesion.long_axis == pytest.approx(120, abs=3)  # 2 a, to about a pixel
    assert lesion.short_axis == pytest.approx(50, abs=3)  # 2 b
    assert lesion.shape == "oval" and lesion.margin == "circumscribed"
    assert lesion.area == pytest.approx(math.pi * 60 * 25, rel=0.02)


def test_orientation_is_parallel_when_wider_than_tall_and_not_when_taller():
    assert describe_lesion(ellipse(160, 120, 60, 25)).orientation == "parallel"
    taller = describe_lesion(ellipse(160, 120, 60, 25, math.pi / 2))
    assert taller.orientation == "not parallel" and taller.height > taller.width


def test_a_circle_is_round_and_a_spiculated_outline_is_irregular_and_not_circumscribed():
    assert describe_lesion(ellipse(160, 120, 40, 40)).shape == "round"
    spiculated = describe_lesion(star(160, 120, 45))
    assert spiculated.shape == "irregular" and spiculated.margin == "not circumscribed"
    assert spiculated.solidity < 0.8


def test_sizes_are_in_mm_with_the_pixel_spacing_and_anisotropic_spacing_counts():
    mask = ellipse(160, 120, 60, 25)
    assert describe_lesion(mask, spacing=(0.1, 0.1)).long_axis == pytest.approx(12.0, abs=0.3)
    squeezed = describe_lesion(mask, spacing=(0.1, 0.3))  # each row is 0.3 mm tall
    assert squeezed.unit == "mm" and squeezed.height == pytest.approx(15.0, abs=0.4)
    assert squeezed.width == pytest.approx(12.1, abs=0.2)


def test_posterior_features_read_the_band_below_the_lesion_against_its_sides():
    mask = ellipse(160, 100, 40, 20)
    for below, expected in ((170.0, "enhancement"), (40.0, "shadowing"), (100.0, "none")):
        image = np.full((H, W), 100.0)
        image[121:140, 120:200] = below  # under the lesion (rows 80-120, columns 120-200)
        assert describe_lesion(mask, image=image).posterior == expected
    low = ellipse(160, 225, 40, 14)  # no room below
    assert describe_lesion(low, image=np.full((H, W), 100.0)).posterior is None


def test_the_outline_follows_the_mask_and_only_the_largest_region_counts():
    mask = ellipse(160, 120, 60, 25) | ellipse(20, 20, 5, 5)
    assert largest_region(mask).sum() == ellipse(160, 120, 60, 25).sum()
    outline = np.array(describe_lesion(mask).outline)
    assert outline[:, 0].min() == pytest.approx(100, abs=1) and outline[
        :, 0
    ].max() == pytest.approx(220, abs=1)
    assert describe_lesion(np.zeros((H, W), bool)) is None
    assert lesion_fields(None)["lesion_shape"] is None


def test_likelihood_categories_follow_the_bi_rads_ranges_at_their_edges():
    edges = {0.0: "3", 0.02: "3", 0.0201: "4a", 0.10: "4a", 0.1001: "4b", 0.50: "4b",
             0.5001: "4c", 0.9499: "4c", 0.95: "5", 1.0: "5"}  # fmt: skip
    assert {p: likelihood_category(p) for p in edges} == edges
    for name, (low, high) in LIKELIHOOD_RANGES.items():
        assert likelihood_category((low + high) / 2) == name


def test_category_table_counts_each_category_and_says_how_far_outside_its_range():
    names = ["3"] * 50 + ["4c"] * 10 + ["2"] * 4
    truth = [0] * 45 + [1] * 5 + [1] * 7 + [0] * 3 + [0] * 4
    rows = {row.category: row for row in category_table(names, truth)}
    assert list(rows)[:1] == ["2"] and rows["2"].n == 4 and rows["4b"].n == 0
    assert rows["3"].rate == pytest.approx(0.1) and rows["3"].distance == pytest.approx(0.08)
    assert rows["4c"].rate == pytest.approx(0.7) and rows["4c"].distance == 0.0
    assert rows["3"].rate_low < 0.1 < rows["3"].rate_high


def test_agreement_statistics_match_their_definitions():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:, :6], b[:, 4:] = True, True
    assert dice(a, b) == pytest.approx(2 * 20 / 120) and iou(a, b) == pytest.approx(20 / 100)
    rated = ["oval"] * 6 + ["irregular"] * 4
    readers = ["oval"] * 5 + ["irregular"] * 5
    # observed 0.9; chance 0.6 * 0.5 + 0.4 * 0.5 = 0.5 -> kappa 0.8
    assert cohen_kappa(rated, readers) == pytest.approx(0.8)
    kappa, low, high = kappa_with_ci(rated * 5, readers * 5, n_resamples=300)
    assert kappa == pytest.approx(0.8) and low < 0.8 < high
    assert confusion_table(rated, readers, ["oval", "irregular"]) == [[5, 0], [1, 4]]
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 200).astype(str), rng.integers(0, 3, 200).astype(str)
    assert cohen_kappa(x, y) == pytest.approx(cohen_kappa_score(y, x))
    assert binomial_interval(0, 20)[0] == 0.0 and binomial_interval(20, 20)[1] == 1.0
    low, high = binomial_interval(5, 10)
    assert low == pytest.approx(0.187, abs=1e-3) and high == pytest.approx(0.813, abs=1e-3)
