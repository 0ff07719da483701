"""``busdx demo``: the whole workflow on generated images, with no download.

A synthetic dataset is written, the default recipe trains on it for a few epochs (with random
backbone weights when the ImageNet file is not at hand), is evaluated on its test split and
predicts four of the images; then the bundled model, trained on real scans, predicts the same
files. Everything lands in a new ``<out>/<time>/`` folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from busdx.bundled import DEFAULT_MODEL, list_bundled, resolve_run
from busdx.config import apply_overrides, load_config
from busdx.data.synthetic import write_synthetic_dataset
from busdx.errors import BusdxError
from busdx.inference.batch import Prediction, predict_files
from busdx.inference.predictor import load_model
from busdx.networks.weights import get_weight_spec, resolve_weights_file
from busdx.results import Evaluation
from busdx.runs import create_run_dir, prepare_dataset, save_run
from busdx.workflows.pipeline import train_and_evaluate

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo produced: the run, its test metrics and predictions of four images."""

    run_dir: Path
    metrics: Evaluation
    predictions: list[Prediction]
    bundled_predictions: list[Prediction]  # empty when no bundled model is installed
    seconds: float


def run_demo(
    out: str | Path = "busdx-demo", *, n_per_class: int = 50, epochs: int = 5, progress: bool = True
) -> DemoResult:
    """Generate ``n_per_class`` images of each class, train ``epochs`` epochs, evaluate and
    predict, in a new folder ``out/<time>/``."""
    folder = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir = create_run_dir(folder / "run", "demo")
    data_dir = write_synthetic_dataset(folder / "data", n_per_class=n_per_class, seed=0)
    logger.info("synthetic dataset: %s (%d benign, %d malignant)", data_dir, n_per_class,
                n_per_class)  # fmt: skip
    overrides = [f"train.epochs={epochs}", "train.batch_size=16"]
    try:
        resolve_weights_file(get_weight_spec("vgg16", "imagenet"), download=False)
    except BusdxError as exc:
        logger.warning("%s\nthe demo goes on with random backbone weights", exc)
        overrides.append("model.weights=none")
    config = apply_overrides(load_config(), overrides)
    started = time.perf_counter()
    dataset = prepare_dataset(config, data_dir)
    save_run(run_dir, config, dataset)
    metrics = train_and_evaluate(config, dataset, run_dir, progress=progress)
    examples = (
        sorted((data_dir / "malignant").glob("*.png"))[:2]
        + sorted((data_dir / "benign").glob("*.png"))[:2]
    )
    predictions = list(predict_files(load_model(run_dir), examples, progress=False))
    bundled = []
    if DEFAULT_MODEL in list_bundled():  # the model that ships: no training, no download
        bundled = list(predict_files(load_model(resolve_run(None)), examples, progress=False))
    seconds = time.perf_counter() - started
    return DemoResult(run_dir, metrics, predictions, bundled, seconds)
