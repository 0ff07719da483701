"""The names of the files busdx writes: a run directory, an evaluation, a cross-validation.

Every module that reads or writes one of these files takes its name from here, so the layout
of a run is written down once::

    RUNDIR/
      config.yaml  run.json  split.csv           the resolved config, provenance, the split
      model.pt  last.pt  history.csv             best and last checkpoint, one row per epoch
      model.onnx  model.int8.onnx  export.json   busdx export
      metrics.json  predictions.csv  *.png       the test split (evaluation files below)
      eval/<site>-<split>/                       busdx evaluate: the same evaluation files
      MODEL_CARD.md  report.html                 busdx report

A cross-validation folder holds ``folds.csv``, ``cv_metrics.json``, ``cv_roc_curve.png``, one run
directory per fold (``fold-<k>/``) and the cross-fitted ``ensemble/``.
"""

from __future__ import annotations

from pathlib import Path

# a run directory
CONFIG_FILE = "config.yaml"
INFO_FILE = "run.json"
SPLIT_FILE = "split.csv"
MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"
HISTORY_FILE = "history.csv"
TRAINING_CURVES = "training_curves.png"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXPORT_REPORT = "export.json"
EVAL_DIR = "eval"
MODEL_CARD = "MODEL_CARD.md"
REPORT_HTML = "report.html"

# an evaluation (the run directory itself for its test split, or EVAL_DIR/<name>)
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
LESIONS_FILE = "lesions.csv"  # mask-head models: each image's outline against the reader's
ROC_CURVE = "roc_curve.png"
RELIABILITY = "reliability.png"
CONFUSION_MATRIX = "confusion_matrix.png"
SAMPLE_PREDICTIONS = "sample_predictions.png"
GRADCAM_SAMPLES = "gradcam_samples.png"
VALIDATION_HTML = "validation.html"  # busdx report EVAL_DIR: the local validation page

# a cross-validation folder (fold-<k>/ inside are run directories, ensemble/ one more)
FOLDS_FILE = "folds.csv"
CV_METRICS_FILE = "cv_metrics.json"
CV_ROC_CURVE = "cv_roc_curve.png"
FOLD_GLOB = "fold-*"
ENSEMBLE_DIR = "ensemble"


def fold_dir(cv_dir: Path, fold: int) -> Path:
    """The run directory of fold ``fold`` (0-based) of a cross-validation folder."""
    return cv_dir / f"fold-{fold}"


# a dataset folder: per-image labels, reader scores, patients, sites
LABELS_TABLE = "labels.csv"

# an audit report folder
AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
