"""Grad-CAM: shapes, any registered backbone, and localisation of synthetic lesions."""

import numpy as np
import pytest
import torch
from PIL import Image

from busdx.config import ModelConfig
from busdx.data.synthetic import make_lesion_image, write_synthetic_dataset
from busdx.inference.predictor import load_model
from busdx.networks.classifier import create_model
from busdx.networks.gradcam import explain_image, grad_cam, overlay_heatmap

from conftest import WEIGHTS_DIR, needs_shared, train_run


def _reference_grad_cam(model, images, threshold_logit=0.0):
    """Textbook Grad-CAM through the model's ordinary forward pass, with a hook on the output of
    the backbone's last convolution (and its activation): an independent path to compare."""
    convs = [i for i, layer in enumerate(model.backbone) if isinstance(layer, torch.nn.Conv2d)]
    end = convs[-1] + (2 if isinstance(model.backbone[convs[-1] + 1], torch.nn.ReLU) else 1)
    seen = {}
    hook = model.backbone[end - 1].register_forward_hook(lambda m, i, out: seen.update(a=out))
    try:
        with torch.enable_grad():
            logits = model(images.requires_grad_(True))
            sign = torch.where(logits >= threshold_logit, 1.0, -1.0)
            (gradients,) = torch.autograd.grad((sign * logits).sum(), seen["a"])
    finally:
        hook.remove()
    cams = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * seen["a"]).sum(dim=1))
    return cams / cams.flatten(1).max(dim=1).values[:, None, None], logits


def test_grad_cam_matches_the_textbook_computation_and_trains_nothing():
    torch.manual_seed(0)
    model, _, _ = create_model(ModelConfig(weights="none", trainable_blocks=1), image_size=64)
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        middle = float(model(images).median())  # explain some images as malignant, some benign
    cams, logits = grad_cam(model, images, threshold_logit=middle)
    assert cams.shape == (3, 4, 4) and logits.shape == (3,)
    assert float(cams.min()) >= 0 and float(cams.max()) == pytest.approx(1.0)
    expected_cams, expected_logits = _reference_grad_cam(model, images.clone(), middle)
    torch.testing.assert_close(logits, expected_logits.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cams, expected_cams.detach(), rtol=1e-4, atol=1e-5)
    for name, parameter in model.named_parameters():  # explanations change no weight or flag
        assert torch.equal(parameter, before[name]) and parameter.requires_grad == flags[name]
        assert parameter.grad is None


def test_overlay_keeps_the_original_size_and_marks_the_hot_spot():
    image = Image.new("L", (90, 60), 128)
    cam = np.zeros((4, 4))
    cam[0, 3] = 1.0  # top right
    overlay = np.asarray(overlay_heatmap(image, cam)).astype(int)
    assert overlay.shape == (60, 90, 3)
    assert np.abs(overlay[5, 85] - 128).sum() > 100  # coloured where the map is hot
    assert np.abs(overlay[55, 5] - 128).sum() < 10  # untouched where it is cold


@needs_shared(WEIGHTS_DIR)
def test_heat_map_peaks_on_the_lesion_far_more_often_than_chance(tmp_path):
    """Synthetic scans know where their lesion is; the model was never told.

    The region is the lesion and the acoustic shadow under it (the generator draws malignant
    lesions with stronger posterior shadowing, a BI-RADS sign the model may use): within 15% of
    the image width of the centre, from 15% above to 30% below it. A uniformly random peak
    falls there 13.5% of the time.
    """
    data = write_synthetic_dataset(tmp_path / "data", n_per_class=20, seed=3)
    run = train_run(data, tmp_path / "run", "--image-size", "128", "--batch-size", "8",
                    "--no-progress", epochs=8)  # fmt: skip
    loaded = load_model(run)
    hits = []
    for index in range(30):
        image, (row, col), _ = make_lesion_image(index % 2 == 1, seed=777 + index)
        peak_row, peak_col = explain_image(loaded, image.convert("RGB")).peak(image.size)
        size = image.size[0]
        hits.append(
            abs(peak_col - col) < 0.15 * size and -0.15 * size < peak_row - row < 0.3 * size
        )
    chance = 0.30 * 0.45  # the region's share of the image (it always lies inside it)
    assert np.mean(hits) >= 0.5 and np.mean(hits) >= 3 * chance
