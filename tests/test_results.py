"""Typed results: each file busdx writes has one schema, written from and read back into it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from busdx.results import CVSummary, Evaluation, Metrics
from busdx.stats.metrics import binary_metrics, bootstrap_ci

DOCS = Path(__file__).resolve().parents[1] / "docs"
EVIDENCE = sorted(DOCS.glob("**/*metrics.json"))


def test_the_evidence_files_exist():
    assert len(EVIDENCE) >= 20  # the glob below must not pass by finding nothing


@pytest.mark.parametrize("path", EVIDENCE, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_committed_result_reads_back_into_its_schema(path):
    """Files written by every busdx version behind the docs' numbers still read."""
    raw = json.loads(path.read_text())
    model = (CVSummary if path.name.endswith("cv_metrics.json") else Evaluation).read(path)
    headline = model.pooled["roc_auc"] if isinstance(model, CVSummary) else model.roc_auc
    expected = raw["pooled"]["roc_auc"] if "pooled" in raw else raw["roc_auc"]
    assert headline == expected


def test_metrics_move_resample_counts_out_of_ci_and_keep_undefined_as_nan(tmp_path):
    y = np.array([0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    ci = bootstrap_ci(y, p, threshold=0.9, n_resamples=50)
    metrics = Metrics.model_validate({**binary_metrics(y, p, threshold=0.9), "ci": ci})
    assert (
        "_resamples" not in metrics.ci and metrics.resamples.used + metrics.resamples.skipped == 50
    )
    assert math.isnan(metrics.ppv)  # no positive call: PPV undefined
    metrics.write(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["ppv"] is None  # JSON has no NaN
    again = Metrics.read(tmp_path / "m.json")
    assert math.isnan(again.ppv) and again.sensitivity == metrics.sensitivity == 0.0
    assert again.ci == metrics.ci


def test_an_unknown_field_is_refused():
    fields = {**binary_metrics(np.array([0, 1]), np.array([0.2, 0.8])), "sensitivty": 1.0}
    with pytest.raises(ValidationError, match="sensitivty"):
        Metrics.model_validate(fields)


def test_a_run_metrics_file_round_trips(trained_run, tmp_path):
    result = Evaluation.read(trained_run / "metrics.json")
    assert result.split == "test" and set(result.operating_points) >= {"fixed"}
    result.write(tmp_path / "metrics.json")
    assert Evaluation.read(tmp_path / "metrics.json") == result
