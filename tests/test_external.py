"""External sites: evaluation with reader scores, paired comparison, local calibration."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from busdx.cli import main
from busdx.inference.model_file import read_model_file
from busdx.results import Comparison, Evaluation
from busdx.workflows.head_refit import fit_anchored_layer

from conftest import FAST, train_run


@pytest.fixture(scope="module")
def run_and_site(trained_run, synthetic_data, tmp_path_factory):
    """The session's small trained run, and a copy of the data as a 'site' with readers'
    BI-RADS."""
    root = tmp_path_factory.mktemp("external")
    run = trained_run
    site = shutil.copytree(synthetic_data, root / "hospital")
    rows = ["image,class,birads,relative_path"]
    for index, path in enumerate(sorted(site.rglob("*.png"))):
        label = path.parent.name
        category = (
            ("4b", "5", "4c")[index % 3] if label == "malignant" else ("2", "3", "4a")[index % 3]
        )
        rows.append(f"{path.name},{label},{category},{path.relative_to(site).as_posix()}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    return run, site


def test_external_evaluation_names_the_site_and_compares_with_readers(
    run_and_site, tmp_path, capsys
):
    run, site = run_and_site
    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(run), "--data", str(site), "--split", "all",
            "--site", "Hospital B", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Hospital B" in printed and "readers (BI-RADS) ROC AUC 1.000" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["site"] == "Hospital B" and metrics["promised_sensitivity"] == 0.95
    readers = metrics["readers"]
    assert readers["readers_roc_auc"] == 1.0  # every malignant case was rated 4b or above
    assert readers["operating_points"]["birads>=4b"]["readers"]["specificity"] == 1.0
    assert readers["delta_roc_auc"]["delta"] == pytest.approx(metrics["roc_auc"] - 1.0)
    logits = [float(r["logit"]) for r in csv.DictReader((out / "predictions.csv").open())]
    assert len(logits) == 24


def test_default_output_folder_is_named_after_the_site(run_and_site):
    run, site = run_and_site
    assert main(["evaluate", "--run", str(run), "--data", str(site), "--split", "all",
                 "--no-progress"]) == 0  # fmt: skip
    assert (run / "eval" / "hospital-all" / "metrics.json").is_file()


def test_readers_file_without_the_column_is_a_clear_error(run_and_site, tmp_path, capsys):
    run, site = run_and_site
    bad = tmp_path / "readers.csv"
    bad.write_text("image,class\nx.png,benign\n")
    args = ["evaluate", "--run", str(run), "--data", str(site), "--split", "all",
            "--readers", str(bad), "--out", str(tmp_path / "e"), "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "birads" in capsys.readouterr().err


def test_compare_two_models_on_the_same_images(run_and_site, synthetic_data, tmp_path, capsys):
    run, site = run_and_site
    other = train_run(synthetic_data, tmp_path / "other", *FAST, "--seed", "7")
    for name, model in (("a", run), ("b", other)):
        assert main(["evaluate", "--run", str(model), "--data", str(site), "--split", "all",
                     "--out", str(tmp_path / name), "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "compare.json"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                 "--n-bootstrap", "200"]) == 0  # fmt: skip
    assert "difference" in capsys.readouterr().out
    result = Comparison.read(out)
    a, b = (Evaluation.read(tmp_path / name / "metrics.json") for name in ("a", "b"))
    assert result.n == 24 and result.a.folder == str(tmp_path / "a")
    assert result.roc_auc.delta == pytest.approx(a.roc_auc - b.roc_auc, abs=1e-6)
    assert result.sensitivity.delta == pytest.approx(a.sensitivity - b.sensitivity)
    assert result.roc_auc.low <= result.roc_auc.delta <= result.roc_auc.high
    # a run's own test split and an external site are different images: refused
    assert main(["compare", str(run), str(tmp_path / "a")]) == 2
    assert "different images" in capsys.readouterr().err


def test_local_calibration_writes_a_new_run_and_leaves_the_old_one(run_and_site, tmp_path, capsys):
    run, site = run_and_site
    before = (run / "model.pt").read_bytes()
    out = tmp_path / "local"
    args = ["calibrate", "--run", str(run), "--data", str(site), "--out", str(out),
            "--set", "evaluate.target_sensitivity=1.0", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "calibrated on 24 cases" in capsys.readouterr().out
    assert (run / "model.pt").read_bytes() == before
    calibration = read_model_file(out / "model.pt")[0].calibration
    assert calibration.source.startswith("site hospital: 24")
    assert calibration.cases == {"n": 24, "n_positive": 12}
    info = json.loads((out / "run.json").read_text())
    assert info["calibrated"]["n"] == 24
    # at a target of 1.0 on these very cases, every malignant case is called malignant
    assert main(["evaluate", "--run", str(out), "--data", str(site), "--split", "all",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["sensitivity"] == 1.0
    assert main(["calibrate", "--run", str(run), "--data", str(site), "--out", str(out)]) == 2


def test_report_shows_every_evaluation_site_by_site(run_and_site):
    run, site = run_and_site
    assert main(["evaluate", "--run", str(run), "--data", str(site), "--split", "all",
                 "--site", "Hospital C", "--out", str(run / "eval" / "c"),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["report", str(run)]) == 0
    card = (run / "MODEL_CARD.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    own = next(r for r in rows if "| test |" in r)
    external = next(r for r in rows if r.startswith("| Hospital C | all | 24 (12) |"))
    assert "(0.95)" in own and "1.000 |" in external  # promised sensitivity; readers' AUC
    assert "Hospital C" in (run / "report.html").read_text()


def test_report_of_a_run_without_its_own_test_split(run_and_site, tmp_path):
    run, site = run_and_site
    ensemble_like = tmp_path / "no-test"
    shutil.copytree(run, ensemble_like, ignore=shutil.ignore_patterns("metrics.json", "eval"))
    assert main(["report", str(ensemble_like)]) == 2  # nothing evaluated yet
    assert main(["evaluate", "--run", str(ensemble_like), "--data", str(site), "--split", "all",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["report", str(ensemble_like)]) == 0
    card = (ensemble_like / "MODEL_CARD.md").read_text()
    assert "## Performance on hospital all split (n = 24" in card
    assert "ROC curve (hospital-all)" in (ensemble_like / "report.html").read_text()


def test_anchored_layer_matches_logistic_regression_and_stays_at_its_anchor():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    c = 0.5  # sklearn's objective / (C n) is ours with anchor 0 and strength 1 / (C n)
    w, b = fit_anchored_layer(x, y, np.zeros(5), 0.0, strength=1 / (c * len(x)))
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, reference.coef_[0], atol=1e-4)
    assert b == pytest.approx(reference.intercept_[0], abs=1e-4)
    anchor = np.array([-1.0, 2.0, 0.0, 0.5, 3.0])
    assert fit_anchored_layer(x, y, anchor, 0.2, math.inf) == (anchor, 0.2)
    held, _ = fit_anchored_layer(x, y, anchor, 0.0, strength=1e4)
    np.testing.assert_allclose(held, anchor, atol=1e-3)


def test_refitting_the_head_locally_learns_a_site_that_labels_the_other_way(
    run_and_site, tmp_path, capsys
):
    """A site that labels the other way (classes swapped): temperature and threshold cannot
    change how the model ranks its cases, a refitted last layer can."""
    run, site = run_and_site
    flipped = tmp_path / "flipped"
    shutil.copytree(site / "benign", flipped / "malignant")
    shutil.copytree(site / "malignant", flipped / "benign")
    evaluate = ["evaluate", "--data", str(flipped), "--split", "all", "--no-progress"]
    assert main([*evaluate, "--run", str(run), "--out", str(tmp_path / "before")]) == 0
    before = json.loads((tmp_path / "before" / "metrics.json").read_text())["roc_auc"]
    out = tmp_path / "refit"
    args = ["calibrate", "--run", str(run), "--data", str(flipped), "--out", str(out),
            "--refit-head", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "last layer refitted" in capsys.readouterr().out
    info, payload = read_model_file(out / "model.pt")
    refit = info.calibration.head_refit
    assert not refit["kept_trained_head"] and refit["cases"] == {"n": 24, "n_positive": 12}
    chosen = refit["out_of_fold"][str(refit["strength"])]
    assert chosen["nll"] < refit["out_of_fold"]["inf"]["nll"]
    original = read_model_file(run / "model.pt")[1]["state_dict"]
    changed = [k for k, v in payload["state_dict"].items() if not torch.equal(v, original[k])]
    assert changed == ["head.4.weight", "head.4.bias"]  # only the last layer moved
    assert main([*evaluate, "--run", str(out), "--out", str(tmp_path / "after")]) == 0
    after = json.loads((tmp_path / "after" / "metrics.json").read_text())["roc_auc"]
    assert after > max(before, 0.9)  # scored on the cases it was refitted on
