"""A new hospital's first week with the bundled model: the model card's commands as written,
from a non-editable install whose package folder is read-only; the local figures beside what
the card expects; a threshold promise stated with its confidence."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from busdx.data.synthetic import write_synthetic_dataset
from busdx.evaluation.local_check import check_expectation, describe_threshold
from busdx.results import Interval, Metrics
from busdx.stats.calibration import (
    Calibration,
    positives_needed,
    sensitivity_promise,
    transfer_threshold,
)

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """busdx installed non-editable (a wheel built from this checkout) into a folder of its
    own, package made read-only; the environment's other packages serve its dependencies."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    for path in (target / "busdx").rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    (target / "busdx").chmod(0o555)
    return target


def _card_commands(package: Path) -> list[str]:
    """The shell commands of the bundled model card's "check it" section, as written."""
    card = (package / "bundled_models" / "lite0-3sites" / "MODEL_CARD.md").read_text()
    section = card.split("## Check it on your own cases", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_model_cards_commands_run_as_written_from_a_read_only_install(installed, tmp_path):
    package = installed / "busdx"
    assert not (package / "__init__.py").is_symlink() and ROOT not in package.parents
    before = _tree(package)
    write_synthetic_dataset(tmp_path / "LOCAL", n_per_class=12, seed=5)
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONDONTWRITEBYTECODE": "1"}
    commands = _card_commands(package)
    assert [c.split()[1] for c in commands] == ["evaluate", "report", "calibrate"]
    outputs = []
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "busdx", *command.split()[1:], "--no-progress"]
            if command.split()[1] != "report" else
            [sys.executable, "-m", "busdx", *command.split()[1:]],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        outputs.append(done.stdout)
    assert "against the model card (3 hospitals it never saw" in outputs[0]
    assert "written to busdx-output/lite0-3sites/eval/LOCAL-all" in outputs[0]
    page = tmp_path / "busdx-output/lite0-3sites/eval/LOCAL-all/validation.html"
    assert page.is_file() and "Against what the model card expects" in page.read_text()
    assert "promise: sensitivity >=" in outputs[2] and "with 90% confidence" in outputs[2]
    assert (tmp_path / "busdx-output/lite0-3sites-LOCAL/model.pt").is_file()
    assert _tree(package) == before  # nothing written inside the installed package
    imported = subprocess.run(
        [sys.executable, "-c", "import busdx; print(busdx.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert imported.stdout.strip().startswith(str(installed))  # the installed copy answered


def _metrics(value: float, low: float, high: float) -> Metrics:
    ci = {key: Interval(low=low, high=high) for key in ("roc_auc", "sensitivity", "specificity")}
    base = dict.fromkeys(("accuracy", "balanced_accuracy", "ppv", "npv", "f1", "pr_auc",
                          "brier", "ece"), 0.5)  # fmt: skip
    return Metrics.model_validate({
        "n": 10, "n_positive": 5, "threshold": 0.5, **base, "roc_auc": value,
        "sensitivity": value, "specificity": value, "ci": ci,
        "confusion": {"tp": 1, "fp": 1, "tn": 1, "fn": 1},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("value", "low", "high", "verdict"),
    [(0.80, 0.70, 0.90, "inside"), (0.60, 0.50, 0.70, "below"), (0.97, 0.95, 0.99, "above"),
     (0.65, 0.55, 0.75, "inside")],  # a CI reaching into the range: not beyond the noise
)  # fmt: skip
def test_a_local_result_is_below_or_above_only_beyond_its_ci(value, low, high, verdict):
    sites = {"a": {"roc_auc": 0.74, "sensitivity": 0.74, "specificity": 0.74},
             "b": {"roc_auc": 0.86, "sensitivity": 0.86, "specificity": 0.86}}  # fmt: skip
    check = check_expectation(_metrics(value, low, high), sites)
    assert [row.verdict for row in check.rows] == [verdict] * 3
    assert (check.rows[0].low, check.rows[0].high) == (0.74, 0.86)


def test_positives_needed_is_where_the_distribution_free_bound_first_holds():
    for target, confidence in ((0.95, 0.9), (0.9, 0.95), (0.98, 0.8)):
        n = positives_needed(target, confidence)
        assert 1 - target**n >= confidence > 1 - target ** (n - 1)
    assert positives_needed(0.95, 0.9) == 45
    assert positives_needed(0.95, 0.0) == 1


def test_a_promise_states_its_confidence_as_the_binomial_tail():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 20 + [0] * 30)
    scores = np.where(labels == 1, rng.uniform(0.3, 1, 50), rng.uniform(0, 0.6, 50))
    threshold = np.sort(scores[labels == 1])[2]  # 18 of 20 detected
    promise = sensitivity_promise(labels, scores, threshold, 0.95, 0.9)
    assert (promise.positives, promise.detected) == (20, 18)
    assert promise.confidence_of_target == pytest.approx(binom.sf(2, 20, 0.05))
    assert promise.guaranteed < 18 / 20 and not promise.kept
    assert promise.more_positives_needed == 45 - 20
    assert promise.specificity == pytest.approx(np.mean(scores[labels == 0] < threshold))
    everything = sensitivity_promise(np.ones(45, int), np.ones(45), 0.5, 0.95, 0.9)
    assert everything.kept and everything.more_positives_needed == 0


def test_a_threshold_moves_with_the_temperature_to_the_same_logit_cut():
    moved = transfer_threshold(0.2, 1.5, 0.7)
    assert math.log(moved / (1 - moved)) * 0.7 == pytest.approx(math.log(0.2 / 0.8) * 1.5)


def test_the_threshold_is_described_with_how_often_it_kept_its_promise():
    labels, scores = np.array([0] * 30 + [1] * 30), np.linspace(0, 1, 60)
    promise = sensitivity_promise(labels, scores, 0.4, 0.95, 0.9)
    calibration = Calibration(
        temperature=1.0, threshold=0.4, threshold_policy="target_sensitivity",
        target_sensitivity=0.95, source="out-of-site predictions",
    )  # fmt: skip
    held_out = {"a": {"sensitivity": 0.97}, "b": {"sensitivity": 0.87}}
    text = describe_threshold(calibration, held_out)
    assert "out-of-site predictions" in text and "kept 0.95 at 1 of 2" in text
    promised = calibration.model_copy(update={"sensitivity_promise": promise})
    local = describe_threshold(promised, None)
    assert f"sensitivity >= {promise.guaranteed:.3f} with 90% confidence" in local
    observed = promise.model_copy(update={"confidence": 0.0})
    assert "confidence" not in describe_threshold(
        calibration.model_copy(update={"sensitivity_promise": observed}), None
    )
    youden = Calibration(temperature=1.0, threshold=0.5, threshold_policy="youden")
    assert describe_threshold(youden, None) == "youden threshold, chosen on the validation split"
    assert describe_threshold(None, None) == "fixed threshold, not calibrated"


def test_a_bundled_model_exports_and_compares_into_the_working_directory(tmp_path, monkeypatch):
    from busdx.bundled import resolve_run
    from busdx.cli import main

    bundled = resolve_run(None)
    before = _tree(bundled)
    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset(tmp_path / "LOCAL", n_per_class=6, seed=8)
    assert main(["export", "--run", "lite0-3sites", "--data", "LOCAL"]) == 0
    copy = tmp_path / "busdx-output" / "lite0-3sites"
    assert (copy / "model.onnx").is_file() and (copy / "export.json").is_file()
    assert main(["evaluate", "--run", "lite0-3sites", "--data", "LOCAL", "--no-progress"]) == 0
    assert main(["compare", "lite0-3sites", str(copy / "eval" / "LOCAL-all"),
                 "--n-bootstrap", "100"]) == 0  # fmt: skip
    assert _tree(bundled) == before
