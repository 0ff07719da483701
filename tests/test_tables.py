"""Labelled images listed in a table: BUS-BRA's release layout, a user's own CSV, patients kept
together, readers' BI-RADS from the table, per-scanner reporting and site-balanced sampling."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from busdx.cli import main
from busdx.config import Config
from busdx.data.datasets import scan_dataset, scan_sites
from busdx.data.synthetic import make_lesion_image
from busdx.errors import DataError
from busdx.evaluation.radiologists import compare_with_readers, rank_categories
from busdx.runs import prepare_dataset
from busdx.training.loading import EpochSampler, site_balanced_weights
from busdx.workflows.crossval import assign_folds

from conftest import FAST

CLASSES = ["benign", "malignant"]
SCANNERS = ["GE Logiq 7 @10-14MHz", "Toshiba Aplio 300 @12-14 MHz", "U-Systems @10-14MHz"]


def _scanner(case: int) -> str:
    """Cases 3, 6, 9, 12 (benign and malignant) on the second scanner; case 1 alone (benign)
    on the third."""
    return SCANNERS[2] if case == 1 else SCANNERS[case % 3 == 0]


def _write_bus_bra(root: Path, n_cases: int = 12) -> Path:
    """A folder in BUS-BRA's release layout: two views (-l, -r) of each case's lesion."""
    (root / "Images").mkdir(parents=True)
    (root / "Masks").mkdir()
    rows = []
    for case in range(1, n_cases + 1):
        malignant = case % 2 == 0
        for side in ("l", "r"):
            image, _, mask = make_lesion_image(malignant, seed=case * 10 + len(side + str(case)))
            name = f"bus_{case:04d}-{side}"
            image.save(root / "Images" / f"{name}.png")
            mask.save(root / "Masks" / f"mask_{case:04d}-{side}.png")
            birads = ("4", "5")[case % 4 == 0] if malignant else ("2", "3", "4")[case % 3]
            rows.append([name, case, "histology", "malignant" if malignant else "benign", birads,
                         _scanner(case), 256, 256, "left",
                         "[60,70,50,40]"])  # fmt: skip
    with (root / "bus_data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width",
                         "Height", "Side", "BBOX"])  # fmt: skip
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def bus_bra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bus_bra(tmp_path_factory.mktemp("data") / "bus_bra")


def test_bus_bra_release_reads_as_published(bus_bra):
    dataset = scan_dataset(bus_bra, CLASSES)
    assert dataset.layout == "table" and set(dataset.sites) == {"bus_bra"}
    assert len(dataset.samples) == 24
    first = next(s for s in dataset.samples if s.relpath == "Images/bus_0001-l.png")
    assert first.label == 0 and first.patient == "1" and first.birads in {"2", "3", "4"}
    assert first.scanner == SCANNERS[2] and first.box == (60, 70, 50, 40)
    assert Counter(s.label for s in dataset.samples) == {0: 12, 1: 12}


def test_a_patients_images_share_every_split_and_fold(bus_bra):
    config = Config()
    config.data.val_fraction = config.data.test_fraction = 0.25
    config.data.group_duplicates = False  # patients alone must keep the views together
    dataset = prepare_dataset(config, bus_bra)
    by_case: dict[str, set] = {}
    for sample in dataset.samples:
        by_case.setdefault(sample.patient, set()).add(sample.split)
    assert len(by_case) == 12 and all(len(splits) == 1 for splits in by_case.values())
    folds = assign_folds(dataset, 3, seed=0)
    fold_of: dict[str, set] = {}
    for sample, fold in zip(dataset.samples, folds, strict=True):
        fold_of.setdefault(sample.patient, set()).add(fold)
    assert all(len(f) == 1 for f in fold_of.values()) and set(folds) == {0, 1, 2}


def _write_user_table(folder: Path) -> Path:
    """A hospital's own export: images in one flat folder, listed with odd column capitals,
    two sites and a normal image."""
    images = folder / "export"
    images.mkdir(parents=True)
    lines = ["File,Label,Patient_ID,Site,BI-RADS"]
    for i in range(16):
        malignant = i % 2 == 1
        make_lesion_image(malignant, seed=500 + i)[0].save(images / f"img{i:02d}.png")
        site = "north" if i < 8 else "south"
        label = "Malignant" if malignant else "benign"
        lines.append(f"export/img{i:02d}.png,{label},P{i // 2},{site},{'4c' if malignant else 3}")
    make_lesion_image(False, seed=999)[0].save(images / "normal.png")
    lines.append("export/normal.png,normal,P99,north,1")
    table = folder / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def test_a_users_table_reads_as_it_is(tmp_path):
    table = _write_user_table(tmp_path)
    dataset = scan_dataset(table, CLASSES)
    assert dataset.root == tmp_path and set(dataset.sites) == {"north", "south"}
    assert len(dataset.samples) == 16  # normal left out
    assert {s.relpath for s in dataset.samples} >= {"export/img00.png", "export/img15.png"}
    assert Counter(s.site for s in dataset.samples) == {"north": 8, "south": 8}
    assert len(scan_dataset(table, CLASSES, include_normal=True).samples) == 17
    ranks = rank_categories([s.birads for s in dataset.samples])
    assert ranks is not None and set(ranks) == {2.0, 5.0}  # BI-RADS 3 and 4c


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["name,label", "a.png,benign"], "no path column"),
        (["path,label", "missing.png,benign"], r"labels.csv:2: image 'missing.png' not found"),
        (["path,label", "a.png,cyst"], "label\\(s\\) 'cyst'"),
        (["path,label,box", "a.png,benign,1;2"], "is not x,y,w,h"),
        (["path,label,split", "a.png,benign,train", "a.png,malignant,"], "some rows have a split"),
    ],
)
def test_a_bad_table_is_a_one_line_error_naming_the_row(tmp_path, lines, message):
    make_lesion_image(False, seed=1)[0].save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        scan_dataset(tmp_path / "labels.csv", CLASSES)


def test_a_split_column_makes_the_table_pre_split(tmp_path):
    table = _write_user_table(tmp_path)
    rows = table.read_text().splitlines()
    header, body = rows[0] + ",split", rows[1:-1]
    body = [f"{line},{('train', 'val', 'test', 'train')[i % 4]}" for i, line in enumerate(body)]
    table.write_text("\n".join([header, *body]) + "\n")
    dataset = scan_dataset(table, CLASSES)
    assert dataset.layout == "pre-split"
    assert Counter(s.split for s in dataset.samples) == {"train": 8, "val": 4, "test": 4}


def test_sites_from_folders_and_tables_combine(bus_bra, synthetic_data):
    dataset = scan_sites([f"busi={synthetic_data}", str(bus_bra)], CLASSES)
    assert list(dataset.sites) == ["busi", "bus_bra"]
    assert dataset.layout == "class-folders+table"
    assert all(dataset.root / s.relpath == s.path for s in dataset.samples)
    assert Counter(s.site for s in dataset.samples) == {"busi": 24, "bus_bra": 24}


def test_readers_who_do_not_subdivide_category_4_are_compared_at_4_and_5():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ranks = rank_categories(["2", "3", "4", "4", "4", "5", "5", "4"])
    result = compare_with_readers(y, np.linspace(0, 1, 8), ranks, n_resamples=50)
    points = result.operating_points
    assert set(points) == {"birads>=4", "birads>=5"}
    assert points["birads>=4"].readers["sensitivity"] == 1.0
    assert points["birads>=4"].readers["specificity"] == 0.5
    assert points["birads>=5"].readers["sensitivity"] == 0.5
    subdivided = compare_with_readers(y, np.linspace(0, 1, 8),
                                      rank_categories(["2", "3", "4a", "4b", "4b", "5", "4c", "5"]),
                                      n_resamples=50)  # fmt: skip
    assert set(subdivided.operating_points) == {"birads>=4a", "birads>=4b"}
    assert rank_categories(["2", None]) is None


def test_site_balanced_sampling_draws_each_site_equally_often(bus_bra, synthetic_data):
    dataset = scan_sites([f"big={bus_bra}", f"small={synthetic_data}"], CLASSES)
    small = [s for s in dataset.samples if s.site == "small"][:6]
    samples = [s for s in dataset.samples if s.site == "big"] + small  # 24 vs 6
    weights = site_balanced_weights(samples)
    sampler = EpochSampler(samples, seed=3, weights=weights)
    drawn = Counter()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        drawn.update(samples[index].site for _, index in sampler)
    assert abs(drawn["small"] / drawn.total() - 0.5) < 0.05  # 0.2 without balancing
    sampler.set_epoch(7)
    first, again = list(sampler), list(sampler)
    assert first == again and len(first) == len(samples)
    shares = [list(EpochSampler(samples, seed=3, weights=weights, rank=r, world_size=2))
              for r in range(2)]  # fmt: skip
    sampler.set_epoch(0)
    assert sorted(i for share in shares for _, i in share) == sorted(i for _, i in sampler)


def test_leave_one_site_out_reports_readers_and_scanners(bus_bra, synthetic_data, tmp_path):
    out = tmp_path / "loso"
    args = ["cv", "--data", f"busi={synthetic_data}", "--data", str(bus_bra), "--group-by",
            "site", "--folds", "2", "--out", str(out), "--epochs", "1", *FAST, "--set",
            "evaluate.n_bootstrap=100", "--set", "train.sampling=balanced_sites"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "cv_metrics.json").read_text())
    site = summary["per_site"]["bus_bra"]
    assert site["n"] == 24 and set(site["per_scanner"]) == set(SCANNERS)
    assert sum(row["n"] for row in site["per_scanner"].values()) == 24
    assert "roc_auc" in site["per_scanner"][SCANNERS[1]]
    assert site["per_scanner"][SCANNERS[2]] == {
        "n": 2,
        "n_positive": 0,
        "note": "one class only: no ROC AUC, sensitivity or specificity",
    }
    assert set(site["readers"]["operating_points"]) == {"birads>=4", "birads>=5"}
    assert summary["per_site"]["busi"]["readers"] is None  # no BI-RADS in class folders
    assert "cross-fitted threshold" in site


def test_evaluate_on_a_table_reports_each_scanner_and_the_tables_readers(
    bus_bra, synthetic_data, tmp_path
):
    run = tmp_path / "run"
    assert main(["train", "--data", str(synthetic_data), "--out", str(run), "--epochs", "1",
                 *FAST, "--set", "evaluate.n_bootstrap=100"]) == 0  # fmt: skip
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(bus_bra), "--split", "all",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_scanner"]) == set(SCANNERS)
    assert metrics["per_scanner"][SCANNERS[2]]["note"] == "one class only: no ROC AUC"
    assert metrics["per_scanner"][SCANNERS[1]]["n"] == 8
    assert set(metrics["readers"]["operating_points"]) == {"birads>=4", "birads>=5"}
