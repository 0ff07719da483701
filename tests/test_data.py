import csv
import shutil

import pytest
import torch
from PIL import Image

from busdx.data.datasets import apply_split_file, draw_split, scan_dataset, write_split_csv
from busdx.errors import DataError
from busdx.hardware import resolve_workers
from busdx.training.loading import ImageDataset, item_seed

CLASSES = ["benign", "malignant"]


def _image(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), value).save(path)


def test_class_folder_layout_ignores_masks_and_other_folders(tmp_path):
    for i in range(3):
        _image(tmp_path / "benign" / f"benign ({i}).png")
        _image(tmp_path / "benign" / f"benign ({i})_mask.png")
        _image(tmp_path / "malignant" / f"malignant ({i}).PNG")
        _image(tmp_path / "masks" / "malignant" / f"malignant ({i})_mask.png")
        _image(tmp_path / "normal" / f"normal ({i}).png")
    dataset = scan_dataset(tmp_path, CLASSES)
    assert dataset.layout == "class-folders"
    assert sorted(s.relpath for s in dataset.samples) == sorted(
        [f"benign/benign ({i}).png" for i in range(3)]
        + [f"malignant/malignant ({i}).PNG" for i in range(3)]
    )
    assert {s.label for s in dataset.samples if s.relpath.startswith("malignant")} == {1}
    with_normal = scan_dataset(tmp_path, CLASSES, include_normal=True)
    assert sum(s.label == 0 for s in with_normal.samples) == 6


def test_pre_split_layout_keeps_its_folders(tmp_path):
    for split in ("train", "validation", "test"):
        for name in CLASSES:
            _image(tmp_path / split / name / f"{name}.jpg")
    dataset = scan_dataset(tmp_path, CLASSES)
    assert dataset.layout == "pre-split"
    assert {s.split for s in dataset.samples} == {"train", "val", "test"}
    assert dataset.counts()["val"] == {"benign": 1, "malignant": 1}


def test_split_is_stratified_and_reproducible(synthetic_data):
    samples = scan_dataset(synthetic_data, CLASSES).samples
    first = draw_split(samples, val_fraction=0.25, test_fraction=0.25, seed=3)
    again = draw_split(list(reversed(samples)), val_fraction=0.25, test_fraction=0.25, seed=3)
    other = draw_split(samples, val_fraction=0.25, test_fraction=0.25, seed=4)
    assert [(s.relpath, s.split) for s in first] == [(s.relpath, s.split) for s in again]
    assert [s.split for s in first] != [s.split for s in other]
    for label in (0, 1):
        splits = [s.split for s in first if s.label == label]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (6, 3, 3)


def test_split_file_round_trip(synthetic_data, tmp_path):
    dataset = scan_dataset(synthetic_data, CLASSES)
    dataset.samples = draw_split(dataset.samples, val_fraction=0.2, test_fraction=0.2, seed=0)
    write_split_csv(dataset, tmp_path / "split.csv")
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert len(rows) == 24 and len(rows[0]["sha256"]) == 64
    reloaded = apply_split_file(scan_dataset(synthetic_data, CLASSES), tmp_path / "split.csv")
    assert [(s.relpath, s.split) for s in reloaded.samples] == [
        (s.relpath, s.split) for s in dataset.samples
    ]


def test_split_file_naming_missing_images_is_an_error(synthetic_data, tmp_path):
    (tmp_path / "split.csv").write_text("path,label,split\nbenign/gone.png,benign,train\n")
    with pytest.raises(DataError, match="not found"):
        apply_split_file(scan_dataset(synthetic_data, CLASSES), tmp_path / "split.csv")


def test_bad_files_are_skipped_with_their_names(synthetic_data, tmp_path, caplog):
    copy = shutil.copytree(synthetic_data, tmp_path / "data")
    (copy / "benign" / "zero.png").write_bytes(b"")
    (copy / "malignant" / "text.jpg").write_text("hello")
    dataset = scan_dataset(copy, CLASSES)
    assert len(dataset.samples) == 24
    assert len(dataset.skipped) == 2 and "zero.png" in caplog.text and "text.jpg" in caplog.text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "neither train/"),
        (lambda root: _image(root / "benign" / "a.png"), "no images for class malignant"),
        (
            lambda root: (root / "benign").mkdir(parents=True) or (root / "malignant").mkdir(),
            "no readable images",
        ),
    ],
)
def test_unusable_folders_are_explained(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message):
        scan_dataset(root, CLASSES)


def test_dataset_is_never_modified(synthetic_data):
    before = {p: p.stat().st_mtime_ns for p in synthetic_data.rglob("*")}
    scan_dataset(synthetic_data, CLASSES)
    assert {p: p.stat().st_mtime_ns for p in synthetic_data.rglob("*")} == before


def test_grouped_split_never_separates_a_group(synthetic_data):
    samples = scan_dataset(synthetic_data, CLASSES).samples
    groups = [i // 3 for i in range(len(samples))]  # 8 groups of 3 images
    split = draw_split(samples, val_fraction=0.25, test_fraction=0.25, seed=0, groups=groups)
    by_path = {s.relpath: s.split for s in split}
    pairs = list(zip(samples, groups, strict=True))
    for group in set(groups):
        assert len({by_path[s.relpath] for s, g in pairs if g == group}) == 1
    assert {s.split for s in split} == {"train", "val", "test"}


def test_grouped_split_keeps_train_non_empty(synthetic_data):
    samples = scan_dataset(synthetic_data, CLASSES).samples
    groups = [s.label * 10 + i % 3 for i, s in enumerate(samples)]  # 3 big groups per class
    split = draw_split(samples, val_fraction=0.45, test_fraction=0.45, seed=0, groups=groups)
    assert all(sum(s.split == "train" and s.label == c for s in split) for c in (0, 1))


@pytest.mark.parametrize(
    ("cores", "processes", "expected"),
    [(2, 1, 0), (3, 1, 0), (4, 1, 2), (16, 1, 8), (64, 1, 8), (16, 2, 4), (16, 8, 0)],
)
def test_auto_workers_take_half_of_each_process_share_and_none_on_small_machines(
    monkeypatch, cores, processes, expected
):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert resolve_workers(-1, processes=processes) == expected
    assert resolve_workers(3, processes=processes) == 3  # an explicit count is kept


def test_each_epoch_draws_new_augmentations_reproducibly(synthetic_data):
    from busdx.config import AugmentConfig
    from busdx.data.preprocess import Preprocessing
    from busdx.training.transforms import build_augment_transform, build_decode_transform

    prep = Preprocessing(32, (0.0,) * 3, (1.0,) * 3)
    samples = scan_dataset(synthetic_data, CLASSES).samples[:3]
    augment = build_augment_transform(prep, AugmentConfig())
    images = ImageDataset(samples, build_decode_transform(prep), augment, seed=42)
    views = [images[(epoch, 1)][0] for epoch in (0, 1, 2, 0)]
    assert torch.equal(views[0], views[3])  # the same (seed, epoch, image): the same view
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert len({item_seed(42, epoch, index) for epoch in range(30) for index in range(50)}) == 1500
