import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from busdx.cli import main
from busdx.data.synthetic import decompression_bomb_png
from busdx.inference.batch import predict_files
from busdx.inference.model_file import read_model_file, update_model_file
from busdx.inference.predictor import load_model

from conftest import FAST, train_run


def test_train_writes_a_complete_run_directory(trained_run):
    expected = {
        "config.yaml",
        "split.csv",
        "model.pt",
        "last.pt",
        "history.csv",
        "run.json",
        "training_curves.png",
        "sample_predictions.png",
        "gradcam_samples.png",
        "metrics.json",
        "confusion_matrix.png",
        "roc_curve.png",
        "predictions.csv",
    }
    assert expected <= {p.name for p in trained_run.iterdir()}
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert (
        metrics["split"] == "test"
        and metrics["n"] == 6
        and metrics["positive_class"] == "malignant"
    )
    for key in (
        "accuracy",
        "roc_auc",
        "pr_auc",
        "brier",
        "ece",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
    ):
        assert key in metrics and key in metrics["ci"]
    assert set(metrics["operating_points"]) == {"target_sensitivity", "youden", "fixed"}
    assert metrics["calibrated"] and metrics["threshold_policy"] == "target_sensitivity"
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_prints_and_writes_metrics(trained_run, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(trained_run),
                "--split",
                "val",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "sensitivity" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 6


def test_evaluate_external_data_whole(trained_run, synthetic_data, tmp_path):
    other = shutil.copytree(synthetic_data, tmp_path / "other")
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(trained_run),
                "--data",
                str(other),
                "--split",
                "all",
                "--out",
                str(tmp_path / "e"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == 24


def test_predict_files_and_folders_with_a_bad_file(trained_run, synthetic_data, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.open(next((synthetic_data / "malignant").glob("*.png"))).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "bomb.png").write_bytes(decompression_bomb_png())  # 30000 x 30000 pixels in ~100 KB
    single = next((synthetic_data / "benign").glob("*.png"))
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained_run),
                str(folder),
                str(single),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"bomb.png", "broken.png", "good.png", single.name}
    assert rows["broken.png"]["error"] and not rows["broken.png"]["probability_malignant"]
    assert "900000000 pixels" in rows["bomb.png"]["error"]
    (direct,) = predict_files(load_model(trained_run), [folder / "good.png"], progress=False)
    assert float(rows["good.png"]["probability_malignant"]) == pytest.approx(
        direct.probability, abs=1e-5
    )  # the row of the good file is its own prediction, whatever its neighbours
    assert rows["good.png"]["label"] == direct.label
    stored = read_model_file(trained_run / "model.pt")[0].threshold
    assert float(rows["good.png"]["threshold"]) == pytest.approx(stored)


def test_predict_json(trained_run, synthetic_data, tmp_path):
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained_run),
                str(synthetic_data / "benign"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 12 and all(r["error"] is None for r in rows)


def test_resume_of_a_finished_run_only_re_evaluates(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "finished")
    before = (run / "history.csv").read_text()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "history.csv").read_text() == before


def test_resume_refuses_settings_it_would_ignore_and_allows_more_epochs(
    synthetic_data, tmp_path, capsys
):
    run = train_run(synthetic_data, tmp_path / "run", *FAST, epochs=1)
    for change, named in ((["--lr", "0.5"], "train.lr"),
                          (["--set", "model.hidden_units=0"], "model.hidden_units"),
                          (["--image-size", "64"], "data.image_size")):  # fmt: skip
        assert main(["train", "--resume", str(run), *change, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "start a new run with --out" in err and "\n" not in err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2
    cosine = train_run(synthetic_data, tmp_path / "cosine", *FAST, "--set",
                       "train.schedule=cosine", epochs=1)  # fmt: skip
    assert main(["train", "--resume", str(cosine), "--epochs", "3", "--no-progress"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_a_moved_dataset_is_still_the_runs_own(synthetic_data, tmp_path):
    first = shutil.copytree(synthetic_data, tmp_path / "first")
    run = train_run(first, tmp_path / "run", *FAST, epochs=1)
    moved = first.rename(tmp_path / "moved")
    out = tmp_path / "eval"
    args = ["evaluate", "--run", str(run), "--data", str(moved), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0  # the test split, found by relative path + sha256
    tested = {r["path"] for r in csv.DictReader((out / "predictions.csv").open())}
    split = list(csv.DictReader((run / "split.csv").open()))
    assert tested and {Path(p).name for p in tested} == {
        Path(r["path"]).name for r in split if r["split"] == "test"
    }


def _error_case(tmp_path, synthetic_data, case, trained_run=None):
    one_class = tmp_path / "one"
    shutil.copytree(synthetic_data / "benign", one_class / "benign")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "file").write_text("x")
    return {
        "missing data": ["train", "--data", str(tmp_path / "nope"), *FAST],
        "single class": ["train", "--data", str(one_class), *FAST],
        "existing run dir": ["train", "--data", str(synthetic_data), "--out", str(existing), *FAST],
        "unknown key": ["train", "--data", str(synthetic_data), "--set", "train.epoch=3"],
        "not a run": ["evaluate", "--run", str(tmp_path)],
        "missing image": ["predict", "--run", str(trained_run), str(tmp_path / "x.png")],
        "not a model": ["predict", "--run", str(existing / "file"), str(synthetic_data)],
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "missing data",
        "single class",
        "existing run dir",
        "unknown key",
        "not a run",
        "missing image",
        "not a model",
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, synthetic_data, trained_run, capsys, case):
    assert main(_error_case(tmp_path, synthetic_data, case, trained_run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("busdx: error: ") and "Traceback" not in "\n".join(err)
    if case == "missing image":  # the model loaded; the image is what is missing
        assert err[-1] == f"busdx: error: {tmp_path / 'x.png'} does not exist"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("busdx ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_report_and_model_card(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    card = (run / "MODEL_CARD.md").read_text()
    assert "Research use only" in page and page.count("data:image/png;base64,") == 6
    assert "Grad-CAM" in page
    assert "Not a medical device" in card and "| sensitivity |" in card
    metrics = json.loads((run / "metrics.json").read_text())
    auc = metrics["roc_auc"]
    assert f"{auc:.3f}" in card  # numbers come from metrics.json
    assert "Temperature scaling T =" in card
    html = HTMLParsed(page)
    assert html.orphan_items == 0 and html.open_tags == []  # every <li> inside a <ul>, closed


class HTMLParsed(HTMLParser):
    """Counts list items outside a list and tags left open (void elements aside)."""

    VOID = frozenset({"meta", "img", "br", "hr", "input", "link"})

    def __init__(self, page: str) -> None:
        super().__init__()
        self.open_tags: list[str] = []
        self.orphan_items = 0
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "li" and not {"ul", "ol"} & set(self.open_tags):
            self.orphan_items += 1
        if tag not in self.VOID:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.open_tags:
            del self.open_tags[len(self.open_tags) - 1 - self.open_tags[::-1].index(tag)]


def test_report_escapes_what_the_run_files_say_and_names_every_pooling(trained_run, tmp_path):
    """A site name from a labels table is text, never markup; a multistage head is described
    (it raised KeyError before)."""
    run = shutil.copytree(trained_run, tmp_path / "hostile")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["site"] = "<script>alert(1)</script>"
    (run / "metrics.json").write_text(json.dumps(metrics))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["pooling"] = "multistage"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    card = (run / "MODEL_CARD.md").read_text()
    assert "global average pooling of the last stages" in card


def test_report_of_an_unfinished_run_is_a_user_error(trained_run, tmp_path, capsys):
    unfinished = shutil.copytree(trained_run, tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    assert main(["report", str(unfinished)]) == 2
    assert "finish training, or evaluate it first" in capsys.readouterr().err


def test_uncalibrated_model_still_works_and_says_so(trained_run, tmp_path, capsys):
    legacy = shutil.copytree(trained_run, tmp_path / "legacy")
    info, _ = read_model_file(legacy / "model.pt")
    update_model_file(legacy / "model.pt", info.replace(threshold=0.5, calibration=None))
    assert main(["evaluate", "--run", str(legacy), "--out", str(legacy), "--no-progress"]) == 0
    metrics = json.loads((legacy / "metrics.json").read_text())
    assert metrics["calibrated"] is False and list(metrics["operating_points"]) == ["fixed"]
    assert main(["report", str(legacy)]) == 0
    assert "NOT CALIBRATED" in (legacy / "MODEL_CARD.md").read_text()
