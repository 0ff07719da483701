"""Inference's preprocessing (NumPy and Pillow, no torch) gives training's evaluation input:
the same float32 array within 1e-5, for every preprocessing option, on synthetic images that
exercise each step and on real scans of all three sites."""

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from busdx.data.preprocess import Preprocessing, model_input, normalize, prepare
from busdx.training.transforms import build_decode_transform, build_eval_transform

from conftest import SHARED

CAFFE = ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
OPTIONS = list(itertools.product(
    ("keep", "mask"), ("none", "content"), ("squash", "pad"), ("bilinear", "bicubic"),
))  # fmt: skip
REAL_SCANS = [  # the first scans of each site's release, where ../shared holds them
    *sorted((SHARED / "data" / "busi" / "malignant").glob("*.png"))[:3],
    *sorted((SHARED / "data" / "bus_bra" / "Images").glob("*.png"))[:3],
    *sorted((SHARED / "data" / "breast_lesions_usg" / "benign").glob("*.png"))[:3],
]


def _screenshot(width: int = 300, height: int = 220) -> Image.Image:
    """Speckle inside black margins, with white text and a coloured caliper burned in."""
    rng = np.random.default_rng(3)
    canvas = np.zeros((height, width), dtype=np.uint8)
    canvas[40 : height - 20, 30 : width - 30] = rng.integers(30, 200, (height - 60, width - 60))
    image = Image.fromarray(canvas).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.text((5, 5), "Depth 4.0 cm", fill="white")
    draw.line((60, 80, 140, 120), fill=(255, 255, 0), width=2)
    return image


def _assert_same_input(image: Image.Image, prep: Preprocessing) -> None:
    served = model_input(image, prep)
    evaluated = build_eval_transform(prep)(image).numpy()
    assert served.dtype == np.float32 and served.shape == (3, prep.image_size, prep.image_size)
    np.testing.assert_allclose(served, evaluated, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("annotations", "crop", "resize", "interpolation"), OPTIONS)
@pytest.mark.parametrize("normalization", [CAFFE, IMAGENET], ids=["caffe", "imagenet"])
def test_inference_input_equals_training_evaluation_input(
    annotations, crop, resize, interpolation, normalization
):
    prep = Preprocessing(64, *normalization, interpolation=interpolation, crop=crop,
                         resize=resize, annotations=annotations)  # fmt: skip
    _assert_same_input(_screenshot(), prep)
    _assert_same_input(_screenshot(180, 260), prep)  # taller than wide: padded the other way


@pytest.mark.skipif(not REAL_SCANS, reason="../shared/data holds no scans on this machine")
@pytest.mark.parametrize("scan", REAL_SCANS, ids=lambda path: f"{path.parent.name}/{path.name}")
@pytest.mark.parametrize("options", [("keep", "none", "squash"), ("mask", "content", "pad")])
def test_real_scans_get_the_same_input_served_as_evaluated(scan: Path, options):
    annotations, crop, resize = options
    prep = Preprocessing(224, *IMAGENET, crop=crop, resize=resize, annotations=annotations)
    _assert_same_input(Image.open(scan).convert("RGB"), prep)


def test_a_lesion_mask_in_the_alpha_channel_keeps_the_image_outside_the_lesion():
    """Pillow would premultiply RGB by alpha: the scan outside the mask must survive resizing."""
    image = _screenshot()
    image.putalpha(Image.new("L", image.size, 0))
    prep = Preprocessing(64, *CAFFE)
    pixels = prepare(image, prep)
    assert pixels.shape == (64, 64, 4) and pixels[..., 3].max() == 0
    np.testing.assert_array_equal(pixels[..., :3], prepare(image.convert("RGB"), prep))
    decoded = build_decode_transform(prep)(image).numpy()
    np.testing.assert_array_equal(decoded, pixels.transpose(2, 0, 1))


def test_normalize_is_per_channel_in_pixel_units_and_batches():
    prep = Preprocessing(2, (10.0, 20.0, 30.0), (2.0, 4.0, 5.0))
    pixels = np.full((4, 2, 2, 3), 40, dtype=np.uint8)
    batch = normalize(pixels, prep)
    assert batch.shape == (4, 3, 2, 2)
    assert batch[:, 0].max() == batch[:, 0].min() == 15.0
    assert batch[:, 1].max() == 5.0 and batch[:, 2].min() == 2.0
