"""The training loop: small, visible, resumable.

``fit`` trains the head (and any unfrozen backbone layers) with Adam and binary cross-entropy,
evaluates on the validation split after every epoch, keeps the best model by validation loss as
``model.pt`` and the latest state as ``last.pt``, and appends to ``history.csv``. Each epoch's
shuffling, augmentation and dropout are seeded from (seed, epoch), so a run resumed after a kill
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from busdx.config import Config
from busdx.data.datasets import LabelledDataset
from busdx.data.preprocess import Preprocessing
from busdx.devices import autocast, check_precision, resolve_device
from busdx.distributed import World, all_sum, barrier, current_world
from busdx.errors import CheckpointError, ConfigError
from busdx.fileio import atomic_write_text
from busdx.hardware import resolve_workers
from busdx.inference.model_file import ModelInfo, read_model_file, write_model_file
from busdx.layout import HISTORY_FILE, LAST_FILE, MODEL_FILE
from busdx.networks.classifier import BinaryClassifier, WeightsInfo, create_model
from busdx.stats.metrics import is_positive
from busdx.training.feature_cache import CachedFeatures, FeatureCache
from busdx.training.loading import (
    EpochSampler,
    ImageDataset,
    make_loader,
    read_sample,
    site_balanced_weights,
)
from busdx.training.losses import LesionLoss, Outputs
from busdx.training.optimization import Optimization, average_weights, build_optimizer
from busdx.training.transforms import (
    build_augment_transform,
    build_decode_transform,
    build_normalize_transform,
)

__all__ = [
    "EpochRecord",
    "TrainingState",
    "average_weights",
    "build_loaders",
    "build_model",
    "build_optimizer",
    "evaluate",
    "fit",
    "restore",
    "save_checkpoint",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """One row of ``history.csv``."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000 + epoch


def _right(outputs: Outputs, labels: torch.Tensor) -> int:
    """How many decisions at probability 0.5 (:func:`busdx.stats.metrics.is_positive`) are right."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    called = is_positive(torch.sigmoid(logits.float()), 0.5)
    return int((called.float() == labels).sum().item())


def train_one_epoch(
    forward: Callable[[torch.Tensor], Outputs],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    *,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, int, int]:
    """One pass of ``forward`` (images or features -> logits, or logits and mask logits) over
    ``loader``, whose batches are ``(inputs, labels[, masks, has_mask])``.

    Returns the summed loss, the number right at probability 0.5 and the number seen (summed over
    processes by the caller). ``scaler`` scales fp16 losses. The caller sets train mode.
    """
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels, *masks in loader:
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).float()
        masks = [m.to(device, non_blocking=True).float() for m in masks]
        with autocast(device, precision):
            logits = forward(inputs)
            loss = criterion(logits, labels, *masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += _right(logits, labels)
        seen += len(labels)
    return total_loss, correct, seen


@torch.inference_mode()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    criterion: nn.Module,
    device: torch.device,
    *,
    precision: str = "fp32",
) -> tuple[float, int, int]:
    """Summed loss, number right and number seen of ``forward`` over ``loader``."""
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels, *masks in loader:
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).float()
        masks = [m.to(device, non_blocking=True).float() for m in masks]
        with autocast(device, precision):
            logits = forward(inputs)
        total_loss += criterion(logits, labels, *masks).item() * len(labels)
        correct += _right(logits, labels)
        seen += len(labels)
    return total_loss, correct, seen


@torch.inference_mode()
def _stem_outputs(
    model: BinaryClassifier, loader: Iterable, device: torch.device, precision: str
) -> TensorDataset:
    """Run the frozen stem once over a deterministic loader (validation needs no re-runs)."""
    features, labels = [], []
    for images, batch_labels in loader:
        with autocast(device, precision):
            features.append(model.stem(images.to(device, non_blocking=True)).float().cpu())
        labels.append(batch_labels)
    return TensorDataset(torch.cat(features), torch.cat(labels))


class _Trainable(nn.Module):
    """What a training step runs: the whole model on images, or its trainable layers on cached
    stem outputs (one module, so that DistributedDataParallel can wrap either)."""

    def __init__(self, model: BinaryClassifier, on_stem_outputs: bool) -> None:
        super().__init__()
        self.model = model
        self.on_stem_outputs = on_stem_outputs

    def forward(self, inputs: torch.Tensor) -> Outputs:
        if self.on_stem_outputs:
            return self.model.from_stem(inputs)
        if self.model.mask_decoder is not None:
            return self.model.segment(inputs)
        return self.model(inputs)


def _write_history(path: Path, history: list[EpochRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(history[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(record) for record in history)
    atomic_write_text(path, buffer.getvalue())


def _load_last(path: Path) -> dict[str, Any]:
    try:
        return read_model_file(path)[1]
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; start a new run") from exc


def _inputs(
    config: Config,
    dataset: LabelledDataset,
    model: BinaryClassifier,
    prep: Preprocessing,
    weights: WeightsInfo,
    device: torch.device,
    workers: int,
    progress: bool,
) -> tuple[Dataset, Dataset, bool]:
    """Training set, this process's share of the validation set, and whether the training set
    yields stem outputs (else images):

    * trainable backbone: images, decoded once into memory when they fit;
    * (partly) frozen backbone: augmented images, and the validation images' stem outputs,
      computed once (they never change);
    * frozen stem + feature cache: cached stem outputs of K augmented views of each image.
    """
    world, precision = current_world(), config.train.precision
    train, val = dataset.subset("train"), dataset.subset("val")
    val_share = val[world.rank :: world.size]  # validation sums are pooled over processes
    if config.train.feature_cache:
        cache = FeatureCache.for_config(config, weights, prep)
        views = list(range(1, config.train.cache_views + 1))
        for samples, sample_views in ((train, views), (val, [0])):
            cache.fill(model, samples, sample_views, device=device, workers=workers,
                       progress=progress)  # fmt: skip
        barrier()  # every process's share of the cache is written
        return CachedFeatures(train, cache, views), CachedFeatures(val_share, cache, [0]), True
    decode = build_decode_transform(prep)
    jitter = config.augment.box_jitter if prep.region == "box" else 0.0
    masks = config.model.mask_head
    augment = build_augment_transform(prep, config.augment, with_mask=masks)
    train_read = functools.partial(read_sample, prep=prep, jitter=jitter, masks=masks)
    train_set = ImageDataset(train, decode, augment, seed=config.train.seed, read=train_read,
                             random_read=jitter > 0, masks=masks)  # fmt: skip
    val_set = ImageDataset(val_share, decode, build_normalize_transform(prep, with_mask=masks),
                           read=functools.partial(read_sample, prep=prep, masks=masks),
                           masks=masks)  # fmt: skip
    budget = config.data.memory_cache_mb
    for images in (train_set, val_set) if not model.backbone_frozen else (train_set,):
        if images.preload(image_size=prep.image_size, limit_mb=budget, workers=workers,
                          progress=progress):  # fmt: skip
            budget -= images.decoded.numel() // 2**20
    if not model.backbone_frozen:
        return train_set, val_set, False
    loader = make_loader(val_set, batch_size=config.train.batch_size, workers=workers,
                         device=device)  # fmt: skip
    bar = tqdm(loader, desc="val features", disable=not progress, leave=False)
    return train_set, _stem_outputs(model, bar, device, precision), False


def _process_batch_size(batch_size: int, world: World) -> int:
    """Each process's share of ``train.batch_size`` (the global batch, as in one process)."""
    if batch_size % world.size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes "
            f"({world.size}) so that every process gets an equal share of each batch"
        )
    return batch_size // world.size


@dataclass
class TrainingState:
    """What a resumed run continues from (all of it is in ``last.pt``)."""

    history: list[EpochRecord] = field(default_factory=list)
    best_val_loss: float = float("inf")
    stale_epochs: int = 0

    @property
    def next_epoch(self) -> int:
        return self.history[-1].epoch + 1 if self.history else 1

    def update(self, record: EpochRecord) -> bool:
        """Add an epoch; True when its validation loss is the best so far."""
        self.history.append(record)
        improved = record.val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.stale_epochs = record.val_loss, 0
        else:
            self.stale_epochs += 1
        return improved


def restore(path: Path, model: nn.Module, optimization: Optimization) -> TrainingState:
    """Load ``last.pt`` into the model and optimizer; a fresh state when there is none."""
    if not path.is_file():
        return TrainingState()
    saved = _load_last(path)
    model.load_state_dict(saved["state_dict"])
    optimization.optimizer.load_state_dict(saved["optimizer"])
    if "schedule" in saved:
        optimization.schedule.load_state_dict(saved["schedule"])
    if optimization.scaler is not None and "scaler" in saved:
        optimization.scaler.load_state_dict(saved["scaler"])
    if optimization.ema is not None and "ema" in saved:
        optimization.ema.load_state_dict(saved["ema"])
    history = [EpochRecord(**row) for row in saved["history"]]
    logger.info("resuming %s after epoch %d", path.parent, history[-1].epoch)
    return TrainingState(history, saved["best_val_loss"], saved["stale_epochs"])


@dataclass
class Loaders:
    """What one epoch iterates: the training batches (``step`` maps them to logits, wrapped in
    DistributedDataParallel under torchrun) and the validation batches (``val_forward``)."""

    train: Iterable
    sampler: EpochSampler
    step: nn.Module
    val: Iterable
    val_forward: Callable[[torch.Tensor], torch.Tensor]


def build_loaders(
    config: Config,
    dataset: LabelledDataset,
    model: BinaryClassifier,
    prep: Preprocessing,
    weights: WeightsInfo,
    device: torch.device,
    progress: bool,
    validated: BinaryClassifier | None = None,
) -> Loaders:
    """The training and validation loaders of this process (see :func:`_inputs` for what they
    hold: images, augmented images, or cached stem outputs); ``validated`` is the model that
    validation runs (default ``model``; the weights' average with ``train.ema_epochs``)."""
    world = current_world()
    batch = _process_batch_size(config.train.batch_size, world)
    workers = resolve_workers(config.data.num_workers, processes=world.local_size)
    train_set, val_set, on_stem_outputs = _inputs(
        config, dataset, model, prep, weights, device, workers, progress
    )
    step: nn.Module = _Trainable(model, on_stem_outputs)
    if world.distributed:
        ids = [device.index] if device.type == "cuda" else None  # this process's GPU
        step = DistributedDataParallel(step, device_ids=ids)
    val_on_stem = isinstance(val_set, TensorDataset | CachedFeatures)
    val_forward = _Trainable(validated or model, val_on_stem)
    balanced = config.train.sampling == "balanced_sites"
    sample_weights = site_balanced_weights(train_set.samples) if balanced else None
    sampler = EpochSampler(train_set, seed=config.train.seed, rank=world.rank,
                           world_size=world.size, weights=sample_weights)  # fmt: skip
    train = make_loader(train_set, batch_size=batch, sampler=sampler, workers=workers,
                        device=device)  # fmt: skip
    val_workers = 0 if isinstance(val_set, TensorDataset) else workers  # in memory already
    val = make_loader(val_set, batch_size=batch, workers=val_workers, device=device)
    if world.is_main:
        logger.info("training on %s (%s), %d process(es), %d loader worker(s) each",
                    device, config.train.precision, world.size, workers)  # fmt: skip
    return Loaders(train, sampler, step, val, val_forward)


def build_model(
    config: Config, device: torch.device
) -> tuple[BinaryClassifier, WeightsInfo, Preprocessing]:
    """The recipe's model on ``device``, with the preprocessing the data settings ask for."""
    torch.manual_seed(config.train.seed)
    model, weights, prep = create_model(config.model, image_size=config.data.image_size)
    roi = config.data.region == "box"
    prep = replace(prep, crop=config.data.crop, resize=config.data.resize,
                   annotations=config.data.annotations, region=config.data.region,
                   box_margin=config.data.box_margin if roi else 0.0)  # fmt: skip
    return model.to(device), weights, prep


def fit(
    config: Config, dataset: LabelledDataset, run_dir: Path, *, progress: bool = True
) -> list[EpochRecord]:
    """Train on the train split, select on the val split, write checkpoints into ``run_dir``.

    If ``run_dir/last.pt`` exists, training resumes after its epoch. Returns the full history.
    Under torchrun every process runs this on its share of each batch (DistributedDataParallel);
    process 0 alone writes.
    """
    world = current_world()
    device = world.device(resolve_device(config.train.device))
    check_precision(config.train.precision, device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    progress = progress and world.is_main
    model, weights, prep = build_model(config, device)
    info = ModelInfo.for_training(
        config, {"name": weights.name, "sha256": weights.sha256}, prep, dataset.class_names
    )
    optimization = build_optimizer(config, model, device)
    if config.train.ema_epochs:
        steps = math.ceil(len(dataset.subset("train")) / config.train.batch_size)
        average_weights(model, optimization, config.train.ema_epochs, steps)
    state = restore(run_dir / LAST_FILE, model, optimization)
    if _finished(config, state):
        return state.history
    average = None if optimization.ema is None else optimization.ema.module
    loaders = build_loaders(
        config, dataset, model, prep, weights, device, progress, validated=average
    )  # validated and saved in the model's place
    criterion = LesionLoss(config.train.mask_weight, config.train.mask_boundary_weight)
    epochs, precision = config.train.epochs, config.train.precision
    for epoch in range(state.next_epoch, epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.train.seed, epoch) + world.rank)  # dropout
        loaders.sampler.set_epoch(epoch)
        bar = tqdm(loaders.train, desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)  # fmt: skip
        model.train()
        trained = train_one_epoch(loaders.step, bar, optimization.optimizer, criterion, device,
                                  precision=precision, scaler=optimization.scaler)  # fmt: skip
        optimization.schedule.step()
        model.eval()
        validated = evaluate(loaders.val_forward, loaders.val, criterion, device,
                             precision=precision)  # fmt: skip
        record = _record(epoch, all_sum([*trained, *validated], device), started)
        improved = state.update(record)
        keep = improved or config.train.keep == "last"
        if world.is_main:
            save_checkpoint(run_dir, info, model, state, keep, optimization)
        _log_epoch(record, epochs, improved)
        if _finished(config, state):
            break
    barrier()  # rank 0's files are complete before any process goes on
    return state.history


def _finished(config: Config, state: TrainingState) -> bool:
    """All epochs done, or no validation-loss improvement for ``early_stopping_patience``."""
    patience = config.train.early_stopping_patience
    if patience and state.stale_epochs >= patience:
        logger.info("early stopping: no val-loss improvement in %d epochs", patience)
        return True
    return state.next_epoch > config.train.epochs


def _record(epoch: int, sums: list[float], started: float) -> EpochRecord:
    loss, right, seen, val_loss, val_right, val_seen = sums
    seconds = round(time.perf_counter() - started, 2)
    return EpochRecord(epoch, loss / seen, right / seen, val_loss / val_seen,
                       val_right / val_seen, seconds)  # fmt: skip


def _log_epoch(record: EpochRecord, epochs: int, improved: bool) -> None:
    logger.info(
        "epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  %.0fs%s",
        record.epoch, epochs, record.train_loss, record.train_accuracy, record.val_loss,
        record.val_accuracy, record.seconds, "  *best" if improved else "",
    )  # fmt: skip


def save_checkpoint(
    run_dir: Path,
    info: ModelInfo,
    model: BinaryClassifier,
    state: TrainingState,
    keep: bool,
    optimization: Optimization,
) -> None:
    """Checkpoint the last epoch: ``model.pt`` when it is to be kept (the best so far, or every
    epoch with ``train.keep: last``; the weights' average with ``train.ema_epochs``),
    ``last.pt`` (the state to resume from) and ``history.csv`` always."""
    last = state.history[-1]
    info = info.replace(provenance={"epoch": last.epoch, "val_loss": last.val_loss})
    if keep:
        best = model if optimization.ema is None else optimization.ema.module
        write_model_file(run_dir / MODEL_FILE, info, state_dict=best.state_dict())
    resume = {"history": [asdict(r) for r in state.history], "best_val_loss": state.best_val_loss,
              "stale_epochs": state.stale_epochs, **optimization.state_dict()}  # fmt: skip
    write_model_file(run_dir / LAST_FILE, info, state_dict=model.state_dict(), **resume)
    _write_history(run_dir / HISTORY_FILE, state.history)
