"""Duplicate finding against known ground truth, and leakage detection on a leaky split."""

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from busdx.cli import main
from busdx.config import apply_overrides, load_config
from busdx.data.audit import DuplicatePair, audit_dataset, duplicate_groups
from busdx.data.datasets import scan_dataset
from busdx.data.synthetic import make_lesion_image
from busdx.runs import prepare_dataset

CLASSES = ["benign", "malignant"]


def _jpeg(image):
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue()))


# What the perceptual hash is measured to survive at distance <= 10 (see docs/audit.md).
TRANSFORMS = {
    "mirror": ImageOps.mirror,
    "resize": lambda im: im.resize((180, 180)),
    "rotate": lambda im: im.rotate(1, resample=Image.Resampling.BILINEAR),
    "crop": lambda im: im.crop((3, 3, 253, 253)).resize((256, 256)),
    "jpeg": _jpeg,
}


def _smooth_field(seed):
    """A random smooth scene in speckle: unrelated images share no structure."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    image = np.asarray(coarse.resize((256, 256), Image.Resampling.BICUBIC), float)
    return Image.fromarray(np.clip(image * rng.rayleigh(0.8, image.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def copies_dataset(tmp_path_factory):
    """8 originals per class, each with 5 transformed copies: 96 images, 8 x 2 true groups."""
    root = tmp_path_factory.mktemp("copies")
    truth = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(8):
            original = _smooth_field(500 + 50 * label + i)
            versions = {"orig": original, **{k: f(original) for k, f in TRANSFORMS.items()}}
            for kind, image in versions.items():
                path = f"{name}/{name} {i} {kind}.png"
                image.save(root / path)
                truth[path] = (label, i)
    return root, truth


def test_finds_every_transformed_copy_and_nothing_else(copies_dataset):
    root, truth = copies_dataset
    result = audit_dataset(scan_dataset(root, CLASSES), progress=False)
    group_of = {s.relpath: g for s, g in zip(result.samples, result.groups, strict=True)}
    for a in truth:
        for b in truth:
            assert (group_of[a] == group_of[b]) == (truth[a] == truth[b]), (a, b)
    assert result.summary()["duplicate_groups"] == 16 and result.summary()["largest_group"] == 6


def test_exact_duplicates_and_label_conflicts(tmp_path):
    image, *_ = make_lesion_image(False, seed=1)
    for name in CLASSES:
        (tmp_path / name).mkdir()
        image.save(tmp_path / name / "same.png")
    make_lesion_image(True, seed=2)[0].save(tmp_path / "malignant" / "other.png")
    result = audit_dataset(scan_dataset(tmp_path, CLASSES), progress=False)
    assert result.summary()["exact_duplicate_pairs"] == 1
    assert len(result.label_conflicts) == 1


def test_union_find_groups():
    pairs = [DuplicatePair(0, 1, 2, False), DuplicatePair(1, 3, 4, False)]
    assert duplicate_groups(5, pairs) == [0, 0, 1, 0, 2]


@pytest.fixture
def leaky_presplit(tmp_path):
    """Kaggle-style layout whose validation folder holds a flipped copy of a training image."""
    for split in ("train", "validation"):
        for label, name in enumerate(CLASSES):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                seed = 900 + 10 * label + i + (0 if split == "train" else 500)
                _smooth_field(seed).save(tmp_path / split / name / f"{i}.png")
    leaked = Image.open(tmp_path / "train" / "benign" / "0.png")
    ImageOps.mirror(leaked).save(tmp_path / "validation" / "benign" / "copy.png")
    return tmp_path


def test_leak_across_presplit_folders_is_detected_and_warned(leaky_presplit, caplog, tmp_path):
    result = audit_dataset(scan_dataset(leaky_presplit, CLASSES), progress=False)
    leaks = [result._describe(p) for p in result.cross_split_pairs]
    assert [(d["a"], d["b"]) for d in leaks] == [
        ("train/benign/0.png", "validation/benign/copy.png")
    ]
    config = apply_overrides(load_config(), ["model.weights=none"])
    prepare_dataset(config, leaky_presplit)
    assert "LEAKAGE: 1 duplicate" in caplog.text


def test_audit_command_writes_json_and_html(leaky_presplit, tmp_path, capsys):
    assert (
        main(
            ["audit", "--data", str(leaky_presplit), "--out", str(tmp_path / "a"), "--no-progress"]
        )
        == 0
    )
    assert "LEAKAGE: 1" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["summary"]["cross_split_pairs"] == 1 and report["summary"]["images"] == 13
    page = (tmp_path / "a" / "audit.html").read_text()
    assert "LEAK: different splits" in page and page.count("data:image/jpeg;base64") == 2


def test_grouped_split_is_the_default_for_class_folders(copies_dataset):
    root, truth = copies_dataset
    config = apply_overrides(load_config(), ["model.weights=none"])
    dataset = prepare_dataset(config, root)
    split_of_group = {}
    for sample in dataset.samples:
        split_of_group.setdefault(truth[sample.relpath], set()).add(sample.split)
    assert all(len(splits) == 1 for splits in split_of_group.values())
    assert {s.split for s in dataset.samples} == {"train", "val", "test"}
