"""Several sites in one study: tagging, per-site splits and folds, leave-one-site-out CV."""

import csv
import json
from pathlib import Path

import pytest

from busdx.cli import main
from busdx.config import load_config
from busdx.data.datasets import parse_source, scan_sites
from busdx.data.synthetic import write_synthetic_dataset
from busdx.errors import DataError
from busdx.runs import prepare_dataset, run_sources
from busdx.workflows.crossval import assign_folds

from conftest import FAST

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two synthetic hospitals of 10 + 10 and 8 + 8 images, side by side."""
    root = tmp_path_factory.mktemp("sites")
    north = write_synthetic_dataset(root / "north", n_per_class=10, seed=2)
    south = write_synthetic_dataset(root / "south", n_per_class=8, seed=3)
    return north, south


def test_sources_are_tagged_with_their_site_and_keyed_below_the_common_parent(two_sites):
    north, south = two_sites
    dataset = scan_sites([north, f"coast={south}"], CLASSES)
    assert dataset.sites == {"north": north.resolve(), "coast": south.resolve()}
    assert dataset.site == "north+coast" and dataset.root == north.parent.resolve()
    by_site = {name: [s for s in dataset.samples if s.site == name] for name in dataset.sites}
    assert len(by_site["north"]) == 20 and len(by_site["coast"]) == 16
    assert all(s.relpath.startswith("north/") for s in by_site["north"])
    assert all(s.relpath.startswith("south/") for s in by_site["coast"])
    assert len({s.relpath for s in dataset.samples}) == 36
    single = scan_sites([north], CLASSES)  # one folder: keys relative to it, as always
    assert single.site == "north" and single.samples[0].relpath.split("/")[0] in CLASSES


def test_parse_source_reads_a_site_name_only_before_an_equals_sign(tmp_path):
    assert parse_source("busi=/data/busi") == ("busi", Path("/data/busi"))
    assert parse_source("/data/busi") == (None, Path("/data/busi"))
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_source(odd) == (None, odd)  # an existing folder whose name has "="


def test_bad_site_combinations_are_refused_with_a_fix(two_sites):
    north, south = two_sites
    with pytest.raises(DataError, match="NAME=DIR"):
        scan_sites([north, f"north={south}"], CLASSES)
    with pytest.raises(DataError, match="given twice"):
        scan_sites([north, f"again={north}"], CLASSES)
    with pytest.raises(DataError, match="--data"):
        scan_sites([], CLASSES)


def test_a_drawn_split_and_the_folds_hold_every_site(two_sites):
    config = load_config()
    dataset = prepare_dataset(config, list(two_sites))
    for site in dataset.sites:
        splits = {s.split for s in dataset.samples if s.site == site}
        assert splits == {"train", "val", "test"}
    folds = assign_folds(dataset, 2, seed=0)
    for fold in (0, 1):
        assert {s.site for s, f in zip(dataset.samples, folds, strict=True) if f == fold} == {
            "north",
            "south",
        }
    by_site = assign_folds(dataset, 2, seed=0, group_by="site")
    assert [f for s, f in zip(dataset.samples, by_site, strict=True) if s.site == "south"] == [
        1
    ] * 16
    with pytest.raises(DataError, match="--folds equal"):
        assign_folds(dataset, 3, seed=0, group_by="site")


def test_run_sources_rebuild_the_sites_of_a_run():
    info = {"data_root": "/d", "sites": {"a": "/d/x", "b": "/d/y"}}
    assert run_sources(info) == ["a=/d/x", "b=/d/y"]
    assert run_sources({"data_root": "/d"}) == ["/d"]  # runs from before sites were recorded


def test_training_on_two_sites_reports_each_site(two_sites, tmp_path, capsys):
    north, south = two_sites
    out = tmp_path / "run"
    args = ["train", "--data", str(north), "--data", str(south), "--out", str(out),
            "--epochs", "1", "--set", "evaluate.n_bootstrap=100", *FAST]  # fmt: skip
    assert main(args) == 0
    assert "site north (n=" in capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert set(info["sites"]) == {"north", "south"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_site"]) == {"north", "south"} and metrics["site"] == "north+south"
    assert sum(row["n"] for row in metrics["per_site"].values()) == metrics["n"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["site"] for r in rows} == {"north", "south"}
    # the run's own data, found again from run.json: the same test split, site by site
    assert main(["evaluate", "--run", str(out), "--split", "test", "--no-progress"]) == 0
    again = json.loads((out / "eval" / "north+south-test" / "metrics.json").read_text())
    assert again["per_site"]["south"]["n"] == metrics["per_site"]["south"]["n"]
    assert main(["report", str(out)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "2 sites: north (" in card and "south (" in card


def test_leave_one_site_out_cv_tests_each_site_with_a_model_that_never_saw_it(
    two_sites, tmp_path, capsys
):
    north, south = two_sites
    out = tmp_path / "loso"
    args = ["cv", "--data", str(north), "--data", str(south), "--group-by", "site",
            "--folds", "2", "--out", str(out), "--epochs", "1",
            "--set", "evaluate.n_bootstrap=100", *FAST]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "site south (n=16, 8 positive)" in printed
    for fold, held_out in enumerate(["north", "south"]):
        split = list(csv.DictReader((out / f"fold-{fold}" / "split.csv").open()))
        trained = {r["site"] for r in split if r["split"] in ("train", "val")}
        assert trained == {"north", "south"} - {held_out}
        assert {r["site"] for r in split if r["split"] == "test"} == {held_out}
        tested = json.loads((out / f"fold-{fold}" / "metrics.json").read_text())
        assert tested["site"] == held_out
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert summary["group_by"] == "site" and set(summary["per_site"]) == {"north", "south"}
    south_row = summary["per_site"]["south"]
    assert south_row["n"] == 16 and 0 <= south_row["roc_auc"] <= 1
    assert set(south_row) >= {"each fold at its own threshold", "cross-fitted threshold"}
    regrouped = ["cv", "--data", str(north), "--data", str(south), "--folds", "2",
                 "--out", str(out), "--epochs", "1", *FAST]  # fmt: skip
    assert main(regrouped) != 0  # the same folder, partitioned another way: refused
    assert "other folds" in capsys.readouterr().err
    three = ["cv", "--data", str(north), "--data", str(south), "--group-by", "site",
             "--folds", "3", "--out", str(tmp_path / "loso3"), *FAST]  # fmt: skip
    assert main(three) != 0
    assert "--folds equal to their number" in capsys.readouterr().err
