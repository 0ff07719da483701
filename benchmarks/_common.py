"""Shared helpers of the benchmarks: machine facts, a throughput timer, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from busdx.devices import cpu_flags

REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import onnxruntime
    import torch

    model = next(
        (row.split(":", 1)[1].strip() for row in Path("/proc/cpuinfo").read_text().splitlines()
         if row.startswith("model name")), platform.processor())  # fmt: skip
    flags = cpu_flags()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def throughput(
    run_batch: Callable[[], object], batch: int, *, min_seconds: float, min_batches: int = 2
) -> float:
    """Images per second of ``run_batch`` after one warm-up call."""
    run_batch()
    done, started = 0, time.perf_counter()
    while done < min_batches or time.perf_counter() - started < min_seconds:
        run_batch()
        done += 1
    return done * batch / (time.perf_counter() - started)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
