"""The mask head: masks travel with their images, the loss, learning to outline, and the
outline and measurements in ``busdx predict``, ``busdx evaluate`` and the API."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from busdx.cli import main
from busdx.config import AugmentConfig, ModelConfig
from busdx.data.boxes import find_masks
from busdx.data.datasets import attach_masks, scan_dataset
from busdx.data.imaging import load_image
from busdx.data.preprocess import Preprocessing
from busdx.evaluation.evaluate import evaluate_run
from busdx.inference.predictor import load_model
from busdx.lesion.outline import lesion_from_mask, region_view
from busdx.networks.classifier import create_model
from busdx.serving import ServeSettings, create_app
from busdx.training.loading import ImageDataset, read_sample
from busdx.training.losses import LesionLoss, boundary_band
from busdx.training.transforms import (
    build_augment_transform,
    build_decode_transform,
    build_normalize_transform,
)


def _prep(size=64, **kwargs):
    return Preprocessing(size, (0.0,) * 3, (1.0,) * 3, **kwargs)


def test_geometric_augmentation_moves_image_and_mask_together():
    """The mask rides as the image's fourth channel: after a random affine and flip it still
    covers exactly the bright square it was drawn on."""
    pixels = np.zeros((4, 64, 64), dtype=np.uint8)
    pixels[:, 10:30, 20:50] = 255  # bright square in RGB, and the same square as the mask
    augment = AugmentConfig(rotation_degrees=30, width_shift=0.2, height_shift=0.2,
                            shear_degrees=10, zoom=0.2, horizontal_flip=True)  # fmt: skip
    transform = build_augment_transform(_prep(), augment, with_mask=True)
    for seed in range(5):
        torch.manual_seed(seed)
        image, mask = transform(torch.from_numpy(pixels))
        bright = image[0] > 127
        assert mask.shape == (64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
        overlap = (bright & (mask > 0)).sum() / (bright | (mask > 0)).sum()
        assert overlap > 0.9, (seed, float(overlap))


def test_a_sample_without_a_mask_still_trains_the_classifier(masked_data, tmp_path):
    dataset = attach_masks(scan_dataset(masked_data, ["benign", "malignant"]))
    assert all(s.masks for s in dataset.samples)
    samples = [dataset.samples[0], type(dataset.samples[1])(**{**dataset.samples[1].__dict__,
                                                               "masks": ()})]  # fmt: skip
    prep = _prep()
    images = ImageDataset(samples, build_decode_transform(prep),
                          build_normalize_transform(prep, with_mask=True),
                          read=lambda s: read_sample(s, prep, masks=True), masks=True)  # fmt: skip
    assert images.preload(image_size=64, limit_mb=10) and images.decoded.shape[1] == 4
    image, label, mask, has_mask = images[0]
    assert image.shape == (3, 64, 64) and mask.sum() > 0 and has_mask == 1.0
    assert label == samples[0].label
    _, _, empty, flag = images[1]
    assert empty.sum() == 0 and flag == 0.0


def test_the_bus_bra_release_masks_are_found(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "Masks").mkdir()
    Image.new("L", (40, 30)).save(tmp_path / "Images" / "bus_0007-r.png")
    Image.new("L", (40, 30)).save(tmp_path / "Masks" / "mask_0007-r.png")
    found = find_masks(tmp_path / "Images" / "bus_0007-r.png", tmp_path)
    assert found == [tmp_path / "Masks" / "mask_0007-r.png"]
    assert find_masks(tmp_path / "Images" / "bus_0008-r.png", tmp_path) == []


def test_the_loss_counts_masks_only_where_images_have_one():
    logits, labels = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:6, 2:6] = 1
    classifier_only = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    bad_outline = torch.full((2, 8, 8), 5.0)  # everything called lesion
    loss = LesionLoss(mask_weight=1.0)
    assert loss(logits, labels) == pytest.approx(classifier_only.item())
    none = loss((logits, bad_outline), labels, masks, torch.zeros(2))
    assert none.item() == pytest.approx(classifier_only.item())  # no mask: classifier alone
    perfect = (masks * 20 - 10).clone()
    good = loss((logits, perfect), labels, masks, torch.ones(2)).item()
    bad = loss((logits, bad_outline), labels, masks, torch.ones(2)).item()
    assert classifier_only.item() < good < classifier_only.item() + 0.01 < bad


def test_the_boundary_weight_makes_errors_along_the_outline_cost_more():
    masks = torch.zeros(1, 16, 16)
    masks[:, 4:12, 4:12] = 1
    band = boundary_band(masks, 3)  # one pixel either side of the edge
    assert band[0, 3:13, 3].eq(1).all() and band[0, 4, 4:12].eq(1).all()
    assert band[0, 8, 8] == 0 and band[0, 0, 0] == 0  # deep inside and far outside
    logits, labels = torch.tensor([1.0]), torch.tensor([1.0])
    off_edge, far_off = masks * 20 - 10, masks * 20 - 10
    off_edge[0, 4:12, 4] = -10.0  # the outline one pixel too tight on one side
    far_off[0, 0, 0:8] = 10.0  # as many wrong pixels far from the lesion
    plain, weighted = LesionLoss(), LesionLoss(boundary_weight=4.0, boundary_width=3)
    assert plain((logits, off_edge), labels, masks, torch.ones(1)).item() == pytest.approx(
        plain((logits, far_off), labels, masks, torch.ones(1)).item(), rel=0.05
    )
    assert weighted((logits, off_edge), labels, masks, torch.ones(1)).item() > 1.5 * weighted(
        (logits, far_off), labels, masks, torch.ones(1)).item()  # fmt: skip
    assert LesionLoss(boundary_weight=0.0)((logits, off_edge), labels, masks, torch.ones(1)) == (
        plain((logits, off_edge), labels, masks, torch.ones(1))
    )  # off: the plain loss


@pytest.mark.parametrize("decoder", ["fpn", "unet"])
def test_the_mask_head_learns_to_outline_lesions(masked_data, decoder):
    """A few dozen steps on 8 images: the outline overlaps the reader's mask (Dice > 0.8)."""
    torch.manual_seed(0)
    config = ModelConfig(
        name="efficientnet_lite0",
        weights="none",
        freeze_backbone=False,
        pooling="avg",
        hidden_units=0,
        mask_head=True,
        mask_decoder=decoder,
    )
    model, _, _ = create_model(config, image_size=64)
    dataset = attach_masks(scan_dataset(masked_data, ["benign", "malignant"]))
    prep = _prep()
    images = ImageDataset(dataset.samples[:8], build_decode_transform(prep),
                          build_normalize_transform(prep, with_mask=True),
                          read=lambda s: read_sample(s, prep, masks=True), masks=True)  # fmt: skip
    items = [images[i] for i in range(8)]
    inputs, labels, masks, has_mask = (torch.stack([torch.as_tensor(item[k]) for item in items])
                                       for k in range(4))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = LesionLoss()
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        loss(model.segment(inputs / 128 - 1), labels.float(), masks, has_mask.float()).backward()
        optimizer.step()
    with torch.no_grad():  # batch statistics: from random weights, BatchNorm's running ones
        # (momentum 0.01, as in the TF-trained Lite weights) need far more than 60 steps
        predicted = torch.sigmoid(model.segment(inputs / 128 - 1).masks) > 0.5
    overlap = 2 * (predicted & (masks > 0)).sum() / (predicted.sum() + (masks > 0).sum())
    assert overlap > 0.8, float(overlap)


def test_a_mask_head_on_a_frozen_backbone_is_a_one_line_error(masked_data, tmp_path, capsys):
    code = main(["train", "--data", str(masked_data), "--out", str(tmp_path / "r"), "--set",
                 "model.mask_head=true", "--weights", "none", "--no-progress"])  # fmt: skip
    assert code == 2
    assert "freeze_backbone false" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_outline_is_placed_back_on_the_scan_through_padding():
    """A 200 x 100 scan padded to 200 x 200 and resized to 64: the input's rows 24-40 and
    columns 16-48 are the padded square's rows 75-125 and columns 50-150, so the scan's rows
    25-75 (50 rows of padding above)."""
    scan = Image.new("RGB", (200, 100), (90, 90, 90))
    prep = _prep(resize="pad")
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[24:40, 16:48] = 1.0
    lesion = lesion_from_mask(mask, region_view(scan, None, prep, (0.2, 0.2)), prep)
    outline = np.array(lesion.outline)
    assert outline.min(axis=0) == pytest.approx([50, 25], abs=2)
    assert outline.max(axis=0) == pytest.approx([150, 75], abs=2)
    assert lesion.unit == "mm" and lesion.width == pytest.approx(20, abs=0.5)  # 100 px x 0.2


def test_predict_and_evaluate_report_the_outline_and_its_agreement(mask_run, masked_data, tmp_path):
    image = sorted((masked_data / "malignant").glob("* (1).png"))[0]
    out = tmp_path / "p.json"
    assert main(["predict", "--run", str(mask_run), str(image), "--out", str(out),
                 "--pixel-size", "0.1", "--no-progress"]) == 0  # fmt: skip
    (row,) = json.loads(out.read_text())
    assert row["likelihood_category"] in {"3", "4a", "4b", "4c", "5"}
    if row["lesion_outline"] is not None:  # a model this small may outline nothing
        width, height = Image.open(image).size
        points = np.array(row["lesion_outline"])
        assert points.min() >= 0 and points[:, 0].max() <= width and points[:, 1].max() <= height
        assert row["lesion_unit"] == "mm" and row["lesion_shape"] in {"oval", "round", "irregular"}
    assert main(["evaluate", "--run", str(mask_run), "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 0  # fmt: skip
    seg = json.loads((tmp_path / "e" / "metrics.json").read_text())["segmentation"]
    rows = list(csv.DictReader((tmp_path / "e" / "lesions.csv").open()))
    assert seg["n"] == len(rows) > 0
    assert seg["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-3)
    assert seg["dice_ci"][0] <= seg["dice"] <= seg["dice_ci"][1]
    assert all(r["reader_lesion_shape"] for r in rows)  # the reader's mask is described too
    assert main(["report", str(mask_run)]) == 0  # the model card shows the outlines' Dice
    card = (mask_run / "MODEL_CARD.md").read_text()
    assert "outline Dice" in card and f"{seg['dice']:.3f} [" in card


def test_the_api_answers_the_lesion_and_withholds_the_label_out_of_scope(mask_run, masked_data):
    settings = ServeSettings(workers=1)
    image = sorted((masked_data / "benign").glob("* (2).png"))[0].read_bytes()
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny, format="PNG")
    with TestClient(create_app(mask_run, settings)) as client:
        files = [("files", ("scan.png", image, "image/png")),
                 ("files", ("tiny.png", tiny.getvalue(), "image/png"))]  # fmt: skip
        body = client.post("/predict", files=files, data={"pixel_size": "0.1"}).json()
        scan, one_pixel = body["predictions"]
        assert one_pixel["out_of_scope"] is True and one_pixel["label"] is None
        assert one_pixel["probability_malignant"] is not None and one_pixel["scope_reason"]
        if scan["lesion"] is not None:
            assert scan["lesion"]["unit"] == "mm" and len(scan["lesion"]["outline"]) >= 4
        labelled = client.post("/predict", files=files[1:], data={"label_out_of_scope": "true"})
        assert labelled.json()["predictions"][0]["label"] in {"benign", "malignant"}
        refused = client.post("/predict", files=files[:1], data={"pixel_size": "-1"})
        assert refused.status_code == 422


def test_an_roi_models_outline_is_placed_inside_its_lesion_box():
    """Box-prompted: the input is the box (margin 0.5 on each side, squashed to 64 px), so the
    input's central half is the box itself, at (50, 20) in the scan."""
    scan = Image.new("RGB", (200, 100), (90, 90, 90))
    prep = _prep(region="box", box_margin=0.5)
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 16:48] = 1.0  # the central half of the input: the box without its margin
    lesion = lesion_from_mask(mask, region_view(scan, (50, 20, 60, 40), prep), prep)
    outline = np.array(lesion.outline)
    assert outline.min(axis=0) == pytest.approx([50, 20], abs=2)
    assert outline.max(axis=0) == pytest.approx([110, 60], abs=2)
    assert lesion.unit == "px" and lesion.width == pytest.approx(60, abs=2)


def test_a_mask_head_model_is_evaluated_on_labels_alone_where_there_are_no_masks(
    mask_run, synthetic_data, tmp_path
):
    result, out = evaluate_run(mask_run, [str(synthetic_data)], "all", out=tmp_path / "eval",
                               progress=False)  # fmt: skip
    assert result.n == 24 and result.segmentation is None  # no reader's mask: no Dice
    assert (out / "metrics.json").is_file()


def test_the_onnx_exports_outline_as_the_torch_model_does(mask_run, masked_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mask_run, run)
    assert main(["export", "--run", str(run), "--int8", "--allow-auc-drop"]) == 0
    images = sorted((masked_data / "malignant").glob("*.png"))[:6]
    torch_model = load_model(run, backend="torch")
    batch = torch_model.inputs([load_image(path) for path in images])
    _, _, reference = torch_model.predict(batch)
    for name in ("model.onnx", "model.int8.onnx"):
        exported = load_model(run / name)
        assert exported.outlines and "lesion_mask" in exported.engine.output_names
        _, distances, masks = exported.predict(batch)
        assert masks.shape == reference.shape == (6, 64, 64) and distances.shape == (6,)
        if name == "model.onnx":
            assert np.abs(masks - reference).max() < 1e-4
        else:  # int8: the same lesion, not the same pixels
            overlap = ((masks >= 0.5) & (reference >= 0.5)).sum()
            assert 2 * overlap / max(1, (masks >= 0.5).sum() + (reference >= 0.5).sum()) > 0.8
    rows = {}
    for model in ("model.pt", "model.onnx"):
        out = tmp_path / f"{model}.json"
        assert main(["predict", "--run", str(run / model), str(images[0]), "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
        rows[model] = json.loads(out.read_text())[0]
    assert rows["model.onnx"]["lesion_outline"] == rows["model.pt"]["lesion_outline"]


def test_flip_averages_the_answers_to_an_image_and_its_mirror(mask_run, masked_data, tmp_path):
    """Flip test-time augmentation: the logit is the mean of the image's and the mirror's, the
    mask the mean of both masks in the image's own orientation, so an image and its mirror get
    the same logit and mirrored masks; ``busdx evaluate --flip`` writes beside the plain run."""
    images = sorted((masked_data / "malignant").glob("*.png"))[:4]
    plain, flipped = load_model(mask_run), load_model(mask_run, flip=True)
    batch = plain.inputs([load_image(path) for path in images])
    logits, _, masks = plain.predict(batch)
    mirror_logits, _, mirror_masks = plain.predict(np.ascontiguousarray(batch[..., ::-1]))
    tta_logits, _, tta_masks = flipped.predict(batch)
    assert not np.allclose(masks, mirror_masks[..., ::-1], atol=1e-3)  # not a symmetric model
    assert np.allclose(tta_logits, (logits + mirror_logits) / 2, atol=1e-5)
    assert np.allclose(tta_masks, (masks + mirror_masks[..., ::-1]) / 2, atol=1e-5)
    mirrored_logits, _, mirrored_masks = flipped.predict(np.ascontiguousarray(batch[..., ::-1]))
    assert np.allclose(mirrored_logits, tta_logits, atol=1e-5)
    assert np.allclose(mirrored_masks[..., ::-1], tta_masks, atol=1e-5)
    result, out = evaluate_run(mask_run, [str(masked_data)], "all", flip=True, progress=False)
    assert out.name == f"{masked_data.name}-all-flip" and result.n > 0


def test_the_mask_decoder_can_learn_faster_than_the_pretrained_backbone():
    """``train.decoder_lr_scale``: the decoder, trained from scratch, gets its own learning
    rate; at 1.0 there is one parameter group, so that older runs resume as they were saved."""
    from busdx.config import apply_overrides, load_config
    from busdx.training.optimization import build_optimizer

    base = ["model.weights=none", "model.mask_head=true", "train.lr=0.001"]
    config = apply_overrides(load_config(recipe="efficientnet-lite0"), base)
    model, _, _ = create_model(config.model, image_size=64)
    (group,) = build_optimizer(config, model, torch.device("cpu")).optimizer.param_groups
    assert group["lr"] == pytest.approx(1e-3)
    faster = apply_overrides(config, ["train.decoder_lr_scale=10"])
    groups = build_optimizer(faster, model, torch.device("cpu")).optimizer.param_groups
    decoder = {id(p) for p in model.mask_decoder.parameters()}
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
    assert {id(p) for p in groups[1]["params"]} == decoder
    assert not decoder & {id(p) for p in groups[0]["params"]}
