"""Provenance: the commit, versions and hardware recorded with every run and model file."""

import importlib.metadata
import json
import os
import platform
import re
import subprocess

import torch

from busdx import __version__
from busdx.inference.model_file import read_model_file
from busdx.provenance import git_commit


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


def test_every_run_and_model_file_records_where_it_came_from(trained_run):
    """The record names this machine and these libraries, as the standard library and the
    packages' own metadata report them (not as busdx's own function does)."""
    recorded = json.loads((trained_run / "run.json").read_text())["environment"]
    in_model = read_model_file(trained_run / "model.pt")[0].provenance.environment
    expected_keys = {"busdx_version", "git_commit", "python", "platform", "cpu", "cpu_count",
                     "gpu", "torch", "torchvision", "onnxruntime", "numpy"}  # fmt: skip
    for env in (recorded, in_model):
        assert set(env) == expected_keys
        assert env["busdx_version"] == __version__ == importlib.metadata.version("busdx")
        assert env["python"] == platform.python_version() and env["cpu_count"] == os.cpu_count()
        for library in ("torch", "torchvision", "onnxruntime", "numpy"):
            assert env[library] == importlib.metadata.version(library)
        assert env["gpu"] is None or torch.cuda.is_available()
        commit = env["git_commit"]  # the tests run from a checkout, clean or not
        assert commit is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
