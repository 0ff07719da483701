"""Geometry (content crop, aspect-keeping pad), annotation masking and ultrasound intensity
augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from busdx.config import AugmentConfig
from busdx.data.preprocess import (
    Preprocessing,
    annotation_mask,
    content_box,
    mask_annotations,
    pad_to_square,
)
from busdx.training.transforms import (
    MaskAnnotations,
    UltrasoundIntensity,
    build_eval_transform,
    build_train_transform,
)


def _screenshot() -> Image.Image:
    """A 300x300 'screenshot': black margins, a text line on top, speckle field inside."""
    rng = np.random.default_rng(0)
    canvas = np.zeros((300, 300), dtype=np.uint8)
    canvas[80:220, 60:260] = rng.integers(30, 200, (140, 200))
    image = Image.fromarray(canvas).convert("RGB")
    ImageDraw.Draw(image).text((5, 5), "GE LOGIQ 12L  Gain 45  Depth 4.0 cm", fill="white")
    return image


def test_content_box_finds_the_scan_field_and_ignores_text():
    assert content_box(_screenshot()) == (60, 80, 260, 220)


def _screen_with_panels(cyst_rows: int) -> Image.Image:
    """A 400 x 300 screenshot: a flat grey side panel touching a 250 x 220 speckle field
    (x 80..330, y 60..280) with a dark cyst across most of its width, and a flat title bar
    (further from the field than content_box's max_gap: nearer, it is kept with the field)."""
    rng = np.random.default_rng(0)
    screen = np.zeros((300, 400), np.uint8)
    screen[:, 330:] = 90  # a flat grey side panel, full height, right of the field
    screen[:12, 40:330] = 120  # a flat grey title bar
    field = rng.integers(30, 200, (220, 250)).astype(np.uint8)  # speckle
    field[60 : 60 + cyst_rows, 20:230] = rng.integers(0, 6, (cyst_rows, 210))
    screen[60:280, 80:330] = field
    image = Image.fromarray(screen).convert("RGB")
    ImageDraw.Draw(image).text((10, 285), "L12-5 GAIN 50 DEPTH 4.0 cm", fill=(255, 255, 255))
    return image


def test_content_box_skips_flat_ui_panels_and_bridges_a_dark_cyst():
    found = np.array(content_box(_screen_with_panels(cyst_rows=40)))
    assert np.abs(found - (80, 60, 330, 280)).max() <= 3  # 2-pixel rims of the flat panels


def test_content_box_keeps_the_whole_image_when_a_cyst_splits_the_field():
    assert content_box(_screen_with_panels(cyst_rows=110)) == (0, 0, 400, 300)


def test_content_box_keeps_an_image_with_nothing_to_crop():
    blank = Image.new("RGB", (64, 48))
    assert content_box(blank) == (0, 0, 64, 48)


def test_pad_keeps_the_aspect_ratio_and_eval_transform_applies_geometry():
    padded = pad_to_square(Image.new("RGB", (300, 100), "white"))
    assert padded.size == (300, 300)
    column = np.asarray(padded)[:, 150, 0]
    assert column[:100].max() == 0 and column[100:200].min() == 255
    prep = Preprocessing(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop="content", resize="pad")
    tensor = build_eval_transform(prep)(_screenshot())
    assert tensor.shape == (3, 64, 64)
    assert tensor[:, :8].abs().max() == 0  # the pad above the (wider than tall) field
    restored = Preprocessing.from_dict(prep.to_dict())
    assert restored == prep
    assert (
        Preprocessing.from_dict({"image_size": 8, "mean": [0] * 3, "std": [1] * 3}).crop == "none"
    )


def test_ultrasound_intensity_varies_the_scan_but_not_the_black_outside_it():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 8:24, 8:24] = 120
    augment = UltrasoundIntensity(gain=0.3, contrast=0.3, gamma=0.3, speckle=0.3, blur=1.0,
                                  attenuation=0.5)  # fmt: skip
    torch.manual_seed(0)
    outputs = [augment(image) for _ in range(5)]
    for out in outputs:
        assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
        assert out[:, :8].abs().max() == 0 and out[:, 24:].abs().max() == 0
    means = [float(out[:, 8:24, 8:24].mean()) for out in outputs]
    assert np.std(means) > 1  # each draw differs
    torch.manual_seed(0)
    assert torch.equal(augment(image), outputs[0])  # seeded: reproducible


def test_an_acoustic_shadow_darkens_a_band_below_a_depth_and_nothing_above():
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    torch.manual_seed(1)
    out = UltrasoundIntensity(shadow=0.9)(image)[0]
    darkened = out < 199
    assert darkened.any() and not darkened[:12].any()  # starts at 20% of the depth or deeper
    assert 0 < darkened[-1].sum() < 64  # a band, not the whole width
    assert torch.equal(darkened[-1], darkened[-8])  # the same columns all the way down


@pytest.mark.parametrize("name", ["gain", "speckle", "blur", "attenuation", "shadow"])
def test_each_intensity_option_switches_the_step_on(name):
    prep = Preprocessing(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    steps = build_train_transform(prep, AugmentConfig(**{name: 0.2})).transforms
    assert any(isinstance(step, UltrasoundIntensity) for step in steps)
    plain = build_train_transform(prep, AugmentConfig()).transforms
    assert not any(isinstance(step, UltrasoundIntensity) for step in plain)


def _scan_with_calipers() -> tuple[Image.Image, np.ndarray]:
    """Smooth speckle-like tissue with a white caliper cross, a dotted line and a text label."""
    rng = np.random.default_rng(3)
    tissue = ndimage.gaussian_filter(rng.normal(90, 30, (128, 128)), 1.5).clip(0, 255)
    image = Image.fromarray(tissue.astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.line([(30, 40), (40, 40)], fill="white")
    draw.line([(35, 35), (35, 45)], fill="white")
    for x in range(45, 100, 4):
        draw.point((x, 60), fill="white")
    draw.text((70, 100), "RT 2", fill="white")
    drawn = np.asarray(image)[..., 0] > 240
    return image, drawn


def test_annotation_masking_paints_over_marks_and_leaves_the_tissue():
    image, drawn = _scan_with_calipers()
    marks = annotation_mask(image)
    assert marks[drawn].all()  # every stroke found
    assert marks.mean() < 0.1  # and not much else
    cleaned = np.asarray(MaskAnnotations()(image))
    assert cleaned[..., 0][drawn].max() < 200  # the strokes are gone
    untouched = ~marks
    assert np.array_equal(cleaned[untouched], np.asarray(image)[untouched])
    plain = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    assert MaskAnnotations()(plain) is plain  # nothing to mask: the image itself


def test_annotation_masking_remembers_results_by_content_within_its_budget():
    image, _ = _scan_with_calipers()
    masking = MaskAnnotations()
    first = masking(image)
    again = masking(image.copy())  # same pixels, another object: served from the cache
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.array_equal(np.asarray(again), np.asarray(mask_annotations(image)))
    assert len(masking._cache) == 1
    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert not np.array_equal(np.asarray(masking(other)), np.asarray(first))
    no_room = MaskAnnotations(cache_bytes=0)
    no_room(image)
    assert no_room._cache == {}
    prep = Preprocessing(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), annotations="mask")
    assert Preprocessing.from_dict(prep.to_dict()).annotations == "mask"
    masked, kept = (
        build_eval_transform(prep)(image),
        build_eval_transform(Preprocessing(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))(image),
    )
    assert masked.max() < kept.max()
