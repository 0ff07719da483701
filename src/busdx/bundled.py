"""Models that ship inside busdx, so that ``busdx predict scan.png`` works right after install.

A bundled model is a trimmed run directory in the package (``busdx/bundled_models/NAME/``):
``model.pt`` (the torch model, for ``--explain`` and GPUs), ``model.int8.onnx`` (the CPU model),
``config.yaml``, ``run.json`` and ``MODEL_CARD.md`` (what to expect at a hospital it never saw,
its data and their licences), and ``bundled.json`` (a summary, listed by ``busdx models``).
:func:`resolve_run` turns what a user passed as ``--run`` (nothing, a bundled model's name, or
a run directory) into a folder to load.

A bundled model lives inside the installed package, which may be read-only and is never
written to: whatever a command writes about it (evaluations, reports, a calibrated copy, an
export) goes under ``./busdx-output/NAME/`` in the working directory (:func:`output_home`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from busdx.errors import UnknownModelError

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_MODEL",
    "OUTPUT_ROOT",
    "bundled_info",
    "is_bundled",
    "list_bundled",
    "output_home",
    "resolve_run",
]

BUNDLED_DIR = Path(__file__).parent / "bundled_models"
DEFAULT_MODEL = "lite0-3sites"
SUMMARY_FILE = "bundled.json"
OUTPUT_ROOT = Path("busdx-output")  # under the working directory: outputs about bundled models


def list_bundled() -> list[str]:
    """Names of the models that ship with this busdx."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / SUMMARY_FILE).is_file())


def bundled_info(name: str) -> dict[str, Any]:
    """A bundled model's summary (``bundled.json``), with its folder and size on disk."""
    folder = _bundled_dir(name)
    info = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {**info, "name": name, "path": str(folder), "size_mb": round(size / 2**20, 1)}


def _bundled_dir(name: str) -> Path:
    known = list_bundled()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"no run directory or bundled model {name!r}; bundled: "
            f"{', '.join(known) or 'none'} (busdx models lists them).{hint}"
        )
    return BUNDLED_DIR / name


def resolve_run(run: str | Path | None) -> Path:
    """The folder (or file) to load for ``--run``: the default bundled model when none is
    given, an existing path as it is, else the bundled model of that name."""
    if run is None:
        return _bundled_dir(DEFAULT_MODEL)
    path = Path(run).expanduser()
    if path.exists() or "/" in str(run) or path.suffix:
        return path
    return _bundled_dir(str(run))


def is_bundled(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a model shipped inside the package (never written to)."""
    try:
        return Path(run_dir).resolve().parent == BUNDLED_DIR.resolve()
    except OSError:
        return False


def output_home(run_dir: str | Path) -> Path:
    """Where outputs about a run go by default: the run directory itself, or for a bundled
    model ``./busdx-output/NAME`` (the package is never written to)."""
    run_dir = Path(run_dir)
    return OUTPUT_ROOT / run_dir.name if is_bundled(run_dir) else run_dir
