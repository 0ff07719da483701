"""Grouped cross-validation end to end (tiny settings)."""

import csv
import json

import numpy as np
import pytest

from busdx.cli import main
from busdx.config import apply_overrides, load_config
from busdx.inference.batch import predict_files
from busdx.inference.model_file import read_model_file
from busdx.inference.predictor import load_model
from busdx.workflows.crossfit import leave_one_fold_out_threshold

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
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())  # every out-of-fold prediction
    assert same["n"] == 24 and same["roc_auc"]["delta"] == 0
    crossfit = summary["crossfit"]
    assert len(crossfit["thresholds"]) == 3 and 0 <= crossfit["sensitivity"] <= 1

    # the cross-fitted ensemble: the three fold models, calibrated on all out-of-fold logits
    ensemble = out / "ensemble"
    info = read_model_file(ensemble / "model.pt")[0]
    assert info.ensemble_size == 3 and "out-of-fold" in info.calibration.source
    assert info.calibration.cases == {"n": 24, "n_positive": 12}
    images = sorted(synthetic_data.rglob("*.png"))[:4]
    mean = np.mean([_logits(out / f"fold-{k}", images) for k in range(3)], axis=0)
    assert np.allclose(_logits(ensemble, images), mean, atol=1e-5)
    assert main(["evaluate", "--run", str(ensemble), "--data", str(synthetic_data),
                 "--split", "all", "--out", str(tmp_path / "e"), "--no-progress"]) == 0  # fmt: skip

    # resuming may change evaluate.* settings (the ensemble is recalibrated), nothing else
    careful = [*args, "--set", "evaluate.threshold_confidence=0.9"]
    assert main(careful) == 0
    assert (out / "fold-1" / "metrics.json").stat().st_mtime_ns == stamp
    recalibrated = read_model_file(ensemble / "model.pt")[0]
    assert recalibrated.calibration.threshold_confidence == 0.9
    assert recalibrated.threshold <= info.threshold
    assert main([*args, "--set", "train.lr=0.1"]) == 2


def _logits(run, images):
    loaded = load_model(run)
    return [row.logit for row in predict_files(loaded, images, progress=False)]


def test_cross_fitted_threshold_keeps_its_promise_on_exchangeable_data():
    """Out-of-fold logits from one population: each fold decided by a threshold fitted on the
    others reaches the target sensitivity; asking for 90% confidence errs on the safe side."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 2000)
    logits = rng.normal(0, 1, 4000) + 2.0 * labels
    folds = np.tile(np.arange(5), 800)
    rng.shuffle(folds)
    config = load_config()
    plain, called = leave_one_fold_out_threshold(config, labels, logits, folds)
    assert plain.sensitivity == called[labels == 1].mean()
    assert plain.sensitivity == pytest.approx(0.95, abs=0.015)
    config = apply_overrides(config, ["evaluate.threshold_confidence=0.9"])
    careful, _ = leave_one_fold_out_threshold(config, labels, logits, folds)
    assert careful.sensitivity > plain.sensitivity
    assert careful.specificity < plain.specificity
