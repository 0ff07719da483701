"""The out-of-scope guard: in-scope scans pass, photos and odd files are flagged."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from busdx.cli import main
from busdx.data.imaging import to_rgb
from busdx.data.synthetic import make_lesion_image, not_a_scan_images, write_synthetic_dataset
from busdx.inference.batch import predict_files
from busdx.inference.predictor import load_model
from busdx.inference.scope import image_checks, scope_distances
from busdx.training.scope_fit import Guard

from conftest import train_run


def test_distance_is_the_mahalanobis_distance():
    scope = {"mean": torch.tensor([1.0, 2.0]), "precision": torch.tensor([[4.0, 0.0], [0.0, 1.0]])}
    features = torch.tensor([[1.0, 2.0], [2.0, 2.0], [1.0, 5.0]])
    distances = scope_distances(scope, features.numpy())
    assert np.allclose(distances, [0.0, 2.0, 3.0])
    # the exported ONNX model computes it in torch: the same distances
    guard = Guard(scope["mean"], scope["precision"])
    assert np.allclose(guard(features).numpy(), distances)


def test_pixel_checks_name_what_no_scan_looks_like():
    rng = np.random.default_rng(0)
    scan = make_lesion_image(True, seed=3)[0].resize((300, 200)).convert("RGB")
    assert image_checks(scan) == []
    assert image_checks(Image.new("RGB", (1, 1))) == ["too small for a scan (1x1 px)"]
    assert image_checks(Image.new("L", (400, 40), 90)) == [
        "extreme aspect ratio (400x40 px)",
        "a nearly uniform image",
    ]
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert image_checks(noise) == [
        "a colour image (B-mode ultrasound is greyscale)",
        "no spatial structure (noise or a fine texture, not speckle)",
    ]
    page = Image.new("L", (300, 200), 250)
    page.paste(0, (20, 20, 280, 24))
    assert image_checks(page)[0] == "too few grey levels (a bilevel image, drawing or phantom)"
    assert "mostly white (a page or a screenshot)" in image_checks(page)
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 300).astype(np.uint8), (200, 1)))
    assert image_checks(smooth) == [
        "too smooth for ultrasound speckle (a radiograph, mammogram or gradient)"
    ]


def _out_of_scope_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one-pixel.png")
    Image.new("RGB", (400, 5), (255, 255, 255)).save(folder / "strip.png")
    sky = np.zeros((96, 96, 3), dtype=np.uint8)
    sky[..., 2] = 230
    sky[48:, :, 1] = 160  # blue sky over green grass: a 'photo'
    Image.fromarray(sky).save(folder / "photo.png")
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def guarded_run(synthetic_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("scope")
    options = ["--image-size", "64", "--batch-size", "8", "--no-progress"]
    return train_run(synthetic_data, root / "run", *options, epochs=2)


def test_guard_is_fitted_at_training_and_flags_what_is_not_a_scan(guarded_run, tmp_path):
    loaded = load_model(guarded_run)
    assert loaded.engine.scope["mean"].shape == (512,) and loaded.info.scope.threshold > 0
    fresh = write_synthetic_dataset(tmp_path / "fresh", n_per_class=10, seed=7)
    scans = sorted(fresh.rglob("*.png"))
    odd = _out_of_scope_images(tmp_path / "odd")
    rows = list(predict_files(loaded, scans + odd, progress=False))
    in_scope = [row.out_of_scope for row in rows[: len(scans)]]
    flagged = [row.out_of_scope for row in rows[len(scans) :]]
    assert sum(in_scope) <= 2  # unseen scans of the same kind: at most 10% flagged
    assert all(flagged), dict(zip([p.name for p in odd], flagged, strict=True))


def test_predict_writes_the_out_of_scope_column(guarded_run, tmp_path):
    odd = _out_of_scope_images(tmp_path / "odd")
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(guarded_run), *map(str, odd), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert [r["out_of_scope"] for r in rows] == ["True"] * len(odd)
    reasons = {r["path"].rsplit("/", 1)[-1]: r["scope_reason"] for r in rows}
    assert reasons["one-pixel.png"].startswith("too small for a scan (1x1 px)")
    assert reasons["strip.png"].startswith("too small for a scan (400x5 px)")
    # out of scope: the probability and the reason, but no label ...
    assert all(r["label"] == "" and float(r["probability_malignant"]) >= 0 for r in rows)
    labelled = tmp_path / "labelled.json"  # ... unless asked for
    assert main(["predict", "--run", str(guarded_run), *map(str, odd), "--out", str(labelled),
                 "--label-out-of-scope", "--no-progress"]) == 0  # fmt: skip
    direct = predict_files(load_model(guarded_run), odd, progress=False, label_out_of_scope=True)
    labels = [row.label for row in direct]
    assert [row["label"] for row in json.loads(labelled.read_text())] == labels
    assert set(labels) <= {"benign", "malignant"}


def test_every_synthetic_image_that_is_not_a_scan_is_called_so():
    images = not_a_scan_images(3)
    assert not [name for name, image in images.items() if not image_checks(to_rgb(image))]
    scans = [make_lesion_image(bool(i % 2), seed=200 + i)[0] for i in range(12)]
    assert not [image_checks(to_rgb(scan)) for scan in scans if image_checks(to_rgb(scan))]
