"""What this machine offers, read without torch: CPU feature flags and whether an NVIDIA GPU is
installed. Inference decides its backend on these before (or without) importing torch."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "PRECISIONS",
    "cpu_flags",
    "cpu_has_bf16",
    "cpu_has_vnni",
    "nvidia_gpu_present",
    "resolve_workers",
]

PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere), e.g. avx2, avx512_bf16, amx_bf16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (avx512_bf16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 with 32-bit sums (VNNI or AMX), so that 8-bit int8
    weights cannot saturate."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def nvidia_gpu_present() -> bool:
    """Whether an NVIDIA driver is loaded (Linux): where ``--device auto`` may mean CUDA, so
    the torch model is worth its start-up."""
    return Path("/proc/driver/nvidia/version").is_file()


def resolve_workers(num_workers: int, *, processes: int = 1) -> int:
    """Processes decoding images beside the one computing: ``num_workers``, or for -1 (auto)
    half of this process's share of the cores (the rest compute), at most 8, and none below 4
    cores: on 2 cores a worker slowed both training and prediction (docs/benchmarks.md)."""
    if num_workers >= 0:
        return num_workers
    cores = (os.cpu_count() or 1) // processes
    return min(8, cores // 2) if cores >= 4 else 0
