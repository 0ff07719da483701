"""Where a run or a model file came from: busdx version and commit, library versions, hardware.

Recorded in every ``run.json``, model file and export, so that a number can be traced back to
the code and machine that produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from busdx import __version__

__all__ = ["environment", "git_commit"]

LIBRARIES = ("torch", "torchvision", "onnxruntime", "numpy")


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the git checkout busdx runs from (``+dirty`` if it has local changes), or
    ``None`` for an installed wheel or when git is not available."""
    folder = folder or Path(__file__).resolve().parent
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5,
                check=True,
            ).stdout.strip()  # fmt: skip

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    """The CUDA device's name where torch is already loaded (it is not imported for this)."""
    torch = sys.modules.get("torch")
    return torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None


def environment() -> dict[str, Any]:
    """busdx version and commit, Python and library versions, CPU, core count and GPU."""
    return {
        "busdx_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu(),
    }
