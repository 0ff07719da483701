"""Grouped cross-validation end to end (tiny settings)."""

import csv
import json

from busdx.cli import main

from conftest import FAST


def test_cv_tests_each_image_once_keeps_groups_and_resumes(synthetic_data, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["cv", "--data", str(synthetic_data), "--folds", "3", "--out", str(out),
            "--epochs", "2", "--set", "evaluate.n_bootstrap=200", *FAST]  # fmt: skip
    assert main(args) == 0
    assert "3-fold grouped CV" in capsys.readouterr().out
    folds = list(csv.DictReader((out / "folds.csv").open()))
    assert len(folds) == 24 and {r["fold"] for r in folds} == {"0", "1", "2"}
    fold_of_group = {}
    for row in folds:
        fold_of_group.setdefault(row["group"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    tested = []
    for k in range(3):
        tested += [
            r["path"] for r in csv.DictReader((out / f"fold-{k}" / "predictions.csv").open())
        ]
        split = list(csv.DictReader((out / f"fold-{k}" / "split.csv").open()))
        test_paths = {r["path"] for r in split if r["split"] == "test"}
        assert test_paths == {r["path"] for r in folds if r["fold"] == str(k)}
    assert sorted(tested) == sorted(r["path"] for r in folds)
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert summary["n"] == 24 and len(summary["per_fold"]["roc_auc"]) == 3
    assert 0 <= summary["pooled_ci"]["roc_auc"]["low"] <= summary["pooled"]["roc_auc"]
    stamp = (out / "fold-1" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # resume: finished folds are not retrained
    assert (out / "fold-1" / "metrics.json").stat().st_mtime_ns == stamp
