"""Typed results: what busdx computes and writes as JSON, one schema each.

Each result is a pydantic model: the function that computes it returns the model, the JSON file
is written from it (:meth:`Result.write`) and read back into it (:meth:`Result.read`), so the
file's schema is written down once, here. (Evaluation and cross-validation results are still
plain dicts; they move here next.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from busdx.fileio import write_json

__all__ = [
    "CalibrationImages",
    "ExportReport",
    "ExportedFile",
    "Int8Export",
    "LogitComparison",
    "Result",
]


class Result(BaseModel):
    """A result with a fixed schema: unknown fields are refused, values cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def write(self, path: str | Path) -> None:
        """Write as indented JSON, atomically; every field is written, None as null."""
        write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: str | Path) -> Any:
        """Read a file written by :meth:`write` back into the model (validated)."""
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))


class LogitComparison(Result):
    """Two models' logits on the same labelled images: how often they decide alike (each at
    the reference model's calibration and threshold), how far apart they are, and each ROC AUC
    (None when the images hold a single class)."""

    n: int
    agreement: float
    max_abs_logit_difference: float
    roc_auc_reference: float | None
    roc_auc_candidate: float | None
    roc_auc_drop: float | None


class ExportedFile(Result):
    """The fp32 ONNX file and how it compares with the torch model."""

    file: str
    sha256: str
    opset: int
    vs_torch: LogitComparison


class CalibrationImages(Result):
    source: str
    images: int


class Int8Export(Result):
    """The int8 ONNX file, what calibrated it, and how it compares with the fp32 one."""

    file: str
    sha256: str
    weight_bits: int
    calibration: CalibrationImages
    vs_fp32: LogitComparison
    accepted_auc_drop: bool


class ExportReport(Result):
    """``export.json``: what ``busdx export`` wrote and checked."""

    busdx_version: str
    environment: dict[str, Any]
    source: str
    onnx: ExportedFile
    int8: Int8Export | None = None
