"""Adapt a trained model to a new site from its unlabelled images (``busdx adapt``).

A network with BatchNorm normalises each channel by the mean and variance it saw in training.
A new hospital's scanner shifts those statistics; AdaBN (Li et al., Pattern Recognition 2018)
re-estimates them on the new site's images, no labels needed. ``blend`` mixes the two:
``running = (1 - blend) * trained + blend * site`` (1: the site's alone, as AdaBN; 0: none).
Nothing else changes: weights, temperature and threshold stay as trained, so the threshold's
promise is not re-established here (``busdx calibrate`` does that with labels).

Whether it helps is measured, not assumed (docs/adaptation.md): at three hospitals its recipe
never saw, the site's statistics alone (``blend=1``) lowered ROC AUC at two of them beyond the
noise (BrEaST -0.049, BUS-BRA -0.046) and half-and-half (``blend=0.5``, ``busdx adapt``'s
default) moved it by less than the noise everywhere. So it is opt-in, never applied by itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from busdx.bundled import output_home, resolve_run
from busdx.data.imaging import as_input
from busdx.data.inputs import expand_paths
from busdx.data.preprocess import load_region
from busdx.errors import DataError
from busdx.inference.model_file import update_model_file
from busdx.inference.predictor import Predictor, load_model
from busdx.layout import CONFIG_FILE, INFO_FILE, MODEL_FILE, SPLIT_FILE
from busdx.runs import create_run_dir

__all__ = ["AdaptedRun", "adapt_batchnorm", "adapt_run"]


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(
    loaded: Predictor, files: Sequence[Path], *, blend: float = 1.0, batch_size: int = 32,
    progress: bool = True,
) -> int:  # fmt: skip
    """Re-estimate every BatchNorm layer's running statistics of ``loaded.model`` on ``files``
    (in place), mixed with the trained ones by ``blend``. Returns the number of layers."""
    if loaded.model is None:
        raise DataError("adapting BatchNorm needs the torch model (model.pt), not ONNX")
    if not 0 <= blend <= 1:
        raise DataError(f"blend must be between 0 and 1, not {blend}")
    layers = _batchnorms(loaded.model)
    if not layers:
        raise DataError("the model has no BatchNorm layer to adapt")
    trained = [(layer.running_mean.clone(), layer.running_var.clone(), layer.momentum)
               for layer in layers]  # fmt: skip
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch
        layer.train()
    chunks = range(0, len(files), batch_size)
    for start in tqdm(chunks, desc="site statistics", unit="batch", disable=not progress):
        images = [load_region(as_input(p), loaded.preprocessing)
                  for p in files[start : start + batch_size]]  # fmt: skip
        loaded.model(torch.from_numpy(loaded.inputs(images)).to(loaded.device))
    for layer, (mean, var, momentum) in zip(layers, trained, strict=True):
        layer.running_mean.mul_(blend).add_((1 - blend) * mean)
        layer.running_var.mul_(blend).add_((1 - blend) * var)
        layer.momentum = momentum
    loaded.model.eval()
    return len(layers)


@dataclass(frozen=True)
class AdaptedRun:
    """The new run of :func:`adapt_run`, the images it adapted on and the layers changed."""

    run_dir: Path
    images: int
    layers: int


def adapt_run(
    run: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    out: str | Path | None = None,
    blend: float = 0.5,
    device: str = "auto",
    progress: bool = True,
) -> AdaptedRun:
    """``busdx adapt``: copy a run (or a bundled model) into ``out`` (default
    ``RUNDIR-adapted``; ``busdx-output/NAME-adapted`` for a bundled model) with its BatchNorm
    statistics re-estimated on the unlabelled images under ``data``."""
    run_dir = resolve_run(run)
    files = expand_paths([data] if isinstance(data, str | Path) else data)
    if len(files) < 2:
        raise DataError(f"adapting needs at least 2 images; found {len(files)} in {data}")
    home = output_home(run_dir)
    out = Path(out) if out else home.with_name(f"{home.name}-adapted")
    if out.exists() and any(out.iterdir()):
        create_run_dir(out, "adapted")  # refuses it, saying what to do
    loaded = load_model(run_dir, device=device)
    layers = adapt_batchnorm(loaded, files, blend=blend, progress=progress)  # nothing written yet
    create_run_dir(out, "adapted")
    for name in (CONFIG_FILE, INFO_FILE, SPLIT_FILE, MODEL_FILE):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    state = {key: value.cpu() for key, value in loaded.model.state_dict().items()}
    record = {"method": "batchnorm statistics (AdaBN)", "blend": blend, "images": len(files),
              "from_run": str(run_dir.resolve()), "data": str(data)}  # fmt: skip
    adapted = loaded.info.replace(provenance={"adaptation": record})
    update_model_file(out / MODEL_FILE, adapted, state_dict=state)
    return AdaptedRun(out, len(files), layers)
