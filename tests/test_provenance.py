"""Provenance: the commit, versions and hardware recorded with every run and model file."""

import json
import subprocess

import torch

from busdx import __version__
from busdx.provenance import environment, git_commit

from conftest import FAST, train_run


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_git_commit_names_the_checkout_and_says_when_it_has_local_changes(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout (an installed wheel)
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert git_commit(tmp_path) == head and len(head) == 40
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "+dirty"


def test_every_run_and_model_file_records_where_it_came_from(synthetic_data, tmp_path):
    run = train_run(synthetic_data, tmp_path / "run", *FAST, epochs=1)
    recorded = json.loads((run / "run.json").read_text())["environment"]
    in_model = torch.load(run / "model.pt", weights_only=True)["environment"]
    for env in (recorded, in_model):
        assert env["busdx_version"] == __version__ == "0.2.0"
        assert env["torch"] == torch.__version__.split("+")[0] and env["cpu_count"] >= 1
        assert set(env) == set(environment())
