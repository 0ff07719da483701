"""Typed results: what busdx computes and writes as JSON, one schema each.

Each result is a pydantic model: the function that computes it returns the model, the JSON file
is written from it (:meth:`Result.write`) and read back into it (:meth:`Result.read`), so the
file's schema is written down once, here: an evaluation (``metrics.json``), a cross-validation
(``cv_metrics.json``) and an export (``export.json``). An undefined ratio (sensitivity with no
positive case) is NaN in the model and null in the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from busdx.fileio import write_json

__all__ = [
    "CVSummary",
    "CalibrationImages",
    "Compared",
    "Comparison",
    "Confusion",
    "CrossFit",
    "Evaluation",
    "ExpectedRange",
    "ExportReport",
    "ExportedFile",
    "Int8Export",
    "Interval",
    "LocalCheck",
    "LogitComparison",
    "Metrics",
    "OneClassGroup",
    "PairedDelta",
    "ReaderComparison",
    "Result",
    "Segmentation",
    "SensitivityPromise",
    "SiteSummary",
]

EACH_FOLD = "each fold at its own threshold"  # CV decisions at each fold's validation threshold
CROSS_FITTED = "cross-fitted threshold"  # CV decisions at the other folds' fitted threshold


class Result(BaseModel):
    """A result with a fixed schema: unknown fields are refused, values cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def write(self, path: str | Path) -> None:
        """Write as indented JSON, atomically; every field is written, None as null."""
        write_json(path, self.model_dump(mode="json", by_alias=True))

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
    kept_in_float: list[str] = []  # node-name prefixes left in float (mixed precision)
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


def _nan_for_null(value: Any) -> Any:
    return math.nan if value is None else value


Ratio = Annotated[float, BeforeValidator(_nan_for_null)]
"""A metric that may be undefined: NaN here, null in JSON."""


class Interval(Result):
    """A confidence interval (NaN ends when no resample defined the metric)."""

    low: Ratio
    high: Ratio


class Resamples(Result):
    """How many bootstrap resamples an interval used (a resample of one class is skipped)."""

    used: int
    skipped: int
    level: float


class Confusion(Result):
    tp: int
    fp: int
    tn: int
    fn: int


class Metrics(Result):
    """:func:`busdx.stats.metrics.binary_metrics` at one threshold, with bootstrap CIs per metric.

    ``threshold`` is None for decisions made elsewhere (each CV fold at its own threshold).
    """

    n: int
    n_positive: int
    threshold: float | None
    accuracy: Ratio
    balanced_accuracy: Ratio
    roc_auc: Ratio
    sensitivity: Ratio
    specificity: Ratio
    ppv: Ratio
    npv: Ratio
    f1: Ratio
    pr_auc: Ratio
    brier: Ratio
    ece: Ratio
    confusion: Confusion
    ci: dict[str, Interval] = {}
    resamples: Resamples | None = None

    @model_validator(mode="before")
    @classmethod
    def _resamples_out_of_ci(cls, data: Any) -> Any:
        """:func:`busdx.stats.metrics.bootstrap_ci` (and files before busdx 0.9) keep the resample
        counts in ``ci["_resamples"]``."""
        if isinstance(data, dict) and "_resamples" in data.get("ci", {}):
            ci = dict(data["ci"])
            data = {**data, "ci": ci, "resamples": ci.pop("_resamples")}
        return data


class OneClassGroup(Result):
    """A site or scanner whose images are all of one class: counts, no ranking."""

    n: int
    n_positive: int
    note: str


class PairedDelta(Result):
    """:func:`busdx.stats.metrics.paired_bootstrap`: metric(A) - metric(B) on the same cases."""

    a: Ratio
    b: Ratio
    delta: Ratio
    low: Ratio
    high: Ratio
    p_value: Ratio
    n: int
    resamples: int
    level: float


class ReaderPoint(Result):
    """The readers at one BI-RADS cut and the model at the readers' sensitivity."""

    readers: dict[str, Ratio]
    readers_ci: dict[str, Interval]
    model_threshold: float
    model_specificity_at_readers_sensitivity: Ratio
    delta_specificity: PairedDelta


class ReaderComparison(Result):
    """:func:`busdx.evaluation.radiologists.compare_with_readers`: the readers' BI-RADS beside
    the model."""

    n: int
    readers_roc_auc: Ratio
    readers_roc_auc_ci: Interval
    delta_roc_auc: PairedDelta
    operating_points: dict[str, ReaderPoint]


class ReliabilityBin(Result):
    low: float
    high: float
    count: int
    mean_predicted: float
    observed: float


class ModelFacts(Result):
    busdx_version: str
    weights: dict[str, Any]
    epoch: int | None = None


class Segmentation(Result):
    """How well a mask-head model outlines lesions against the readers' masks
    (:func:`busdx.evaluation.segmentation.summarise_lesions`)."""

    n: int  # images with a reader's mask
    dice: float
    dice_ci: tuple[float, float]
    dice_median: float
    iou: float
    iou_ci: tuple[float, float]
    outlined: int  # images where the model outlined something
    long_axis_error: float | None  # mean |model - reader| longest diameter, in ``unit``
    unit: str | None


class ExpectedRange(Result):
    """One metric of a local evaluation beside the range the model card expects."""

    metric: str
    local: Ratio
    local_ci: Interval | None
    low: float  # the lowest held-out hospital's value in the model card's study
    high: float  # the highest
    verdict: str  # "inside", "below" or "above" (the local CI clears the range)


class LocalCheck(Result):
    """A local evaluation against what the model card expects at a hospital the model never
    saw (:func:`busdx.evaluation.local_check.check_expectation`)."""

    source: str
    sites: list[str]
    rows: list[ExpectedRange]


class Evaluation(Metrics):
    """``metrics.json``: a model on a labelled set, at its threshold (the inherited fields),
    at each candidate operating point, by site and scanner, and against the readers.

    Defaults stand for fields that files written before busdx 0.9 lack.
    """

    site: str = ""
    split: str
    data: str
    positive_class: str
    threshold_policy: str
    ci_level: float = 0.95
    calibrated: bool
    temperature: float | None
    reliability: list[ReliabilityBin]
    operating_points: dict[str, Metrics]
    promised_sensitivity: float | None = None
    out_of_scope_rate: float | None = None
    model: ModelFacts
    per_site: dict[str, Metrics | OneClassGroup] | None = None
    per_scanner: dict[str, Metrics | OneClassGroup] | None = None
    readers: ReaderComparison | None = None
    segmentation: Segmentation | None = None
    expected: LocalCheck | None = None


class SensitivityPromise(Result):
    """What a threshold promises on new cases like the labelled ones it was fitted on
    (:func:`busdx.stats.calibration.sensitivity_promise`)."""

    target: float  # the sensitivity asked for
    confidence: float  # the confidence asked for
    positives: int  # malignant cases the promise rests on
    detected: int  # of them called malignant at the threshold
    guaranteed: float  # sensitivity's one-sided lower bound at `confidence`
    confidence_of_target: float  # probability that sensitivity reaches `target`
    positives_needed: int | None  # malignant cases (all detected) for `target` at `confidence`
    more_positives_needed: int | None  # None: a target of 1, which no finite number shows
    specificity: Ratio  # on the same cases: what the promise costs

    @property
    def kept(self) -> bool:
        """Whether these cases support the target at the asked confidence."""
        return self.confidence_of_target >= self.confidence


class SensitivitySpecificity(Result):
    sensitivity: Ratio
    specificity: Ratio


class SiteSummary(Result):
    """One site (or scanner) of a cross-validation: ranking with CIs, and each decision rule's
    sensitivity and specificity."""

    n: int
    n_positive: int
    roc_auc: Ratio
    pr_auc: Ratio
    brier: Ratio
    ece: Ratio
    ci: dict[str, Interval]
    each_fold: SensitivitySpecificity = Field(alias=EACH_FOLD)
    cross_fitted: SensitivitySpecificity | None = Field(None, alias=CROSS_FITTED)
    readers: ReaderComparison | None = None
    per_scanner: dict[str, SiteSummary | OneClassGroup] | None = None


class CrossFit(Result):
    """:func:`busdx.workflows.crossfit.leave_one_fold_out_threshold`: each fold decided at the
    threshold fitted on the other folds' out-of-fold predictions."""

    policy: str
    target_sensitivity: float
    threshold_confidence: float
    thresholds: list[float]
    sensitivity: Ratio
    specificity: Ratio
    ppv: Ratio
    npv: Ratio
    accuracy: Ratio
    balanced_accuracy: Ratio
    f1: Ratio
    ci: dict[str, Interval]
    confusion: Confusion


class CVSummary(Result):
    """``cv_metrics.json``: pooled out-of-fold metrics with CIs, each fold's, their mean and
    sd, the cross-fitted threshold and each site's table."""

    folds: int
    n: int
    n_positive: int
    threshold_policy: str
    ci_level: float = 0.95
    group_by: str = "duplicates"
    pooled: dict[str, Ratio]
    pooled_ci: dict[str, Interval]
    pooled_confusion: Confusion
    per_fold: dict[str, list[Ratio]]
    mean: dict[str, Ratio]
    sd: dict[str, Ratio]
    crossfit: CrossFit | None = None
    per_site: dict[str, SiteSummary | OneClassGroup] | None = None


class Compared(Result):
    """One side of a comparison: its folder and what it evaluated."""

    folder: str
    site: str
    split: str


class Comparison(Result):
    """``busdx compare``: two models on the same images, A - B with paired bootstrap CIs."""

    a: Compared
    b: Compared
    n: int
    n_positive: int
    ci_level: float
    roc_auc: PairedDelta
    sensitivity: PairedDelta
    specificity: PairedDelta
