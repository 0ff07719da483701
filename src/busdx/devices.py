"""Where the numbers are computed: the device, and in which floating-point precision."""

from __future__ import annotations

import contextlib
import logging

import torch

from busdx.errors import ConfigError
from busdx.hardware import PRECISIONS, cpu_has_bf16

__all__ = ["autocast", "check_precision", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run; warn where it would be slow."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 (or fp32) on a CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        logger.warning("this CPU has no native bf16 (avx512_bf16 / AMX): bf16 will be slow")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision (``torch.autocast``) for ``bf16`` / ``fp16``; nothing for ``fp32``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
