"""The training loop: small, visible, resumable.

``fit`` trains the head (and any unfrozen backbone layers) with Adam and binary cross-entropy,
evaluates on the validation split after every epoch, keeps the best model by validation loss as
``model.pt`` and the latest state as ``last.pt``, and appends to ``history.csv``. Each epoch's
shuffling, augmentation and dropout are seeded from (seed, epoch), so a run resumed after a kill
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from busdx import __version__
from busdx.config import Config
from busdx.data import ImageDataset, LabelledDataset
from busdx.errors import CheckpointError
from busdx.features import CachedFeatures, FeatureCache
from busdx.fileio import atomic_path, atomic_write_text
from busdx.models import BinaryClassifier, WeightsInfo, create_model
from busdx.provenance import environment
from busdx.transforms import Preprocessing, build_eval_transform, build_train_transform

__all__ = [
    "LAST_FILE",
    "MODEL_FILE",
    "EpochRecord",
    "evaluate_epoch",
    "fit",
    "model_metadata",
    "resolve_device",
    "train_one_epoch",
    "update_model_metadata",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"
HISTORY_FILE = "history.csv"


@dataclass
class EpochRecord:
    """One row of ``history.csv``."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000 + epoch


def train_one_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
) -> tuple[float, float]:
    """One pass of ``forward`` (images or features -> logits) over ``loader``.

    Returns mean loss and accuracy at threshold 0.5. The caller puts the model in train mode.
    """
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device).float()
        logits = forward(inputs)
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += ((logits > 0).float() == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


@torch.inference_mode()
def evaluate_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    criterion: nn.Module,
    device: torch.device,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``forward`` (images or features -> logits) over ``loader``."""
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device).float()
        logits = forward(inputs)
        total_loss += criterion(logits, labels).item() * len(labels)
        correct += ((logits > 0).float() == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen


@torch.inference_mode()
def _stem_outputs(model: BinaryClassifier, loader: Iterable, device: torch.device) -> TensorDataset:
    """Run the frozen stem once over a deterministic loader (validation needs no re-runs)."""
    features, labels = [], []
    for images, batch_labels in loader:
        features.append(model.stem(images.to(device)).cpu())
        labels.append(batch_labels)
    return TensorDataset(torch.cat(features), torch.cat(labels))


def model_metadata(
    config: Config, weights: WeightsInfo, prep: Preprocessing, class_names: list[str]
) -> dict[str, Any]:
    """Everything besides the tensors that a model file needs to be used on its own."""
    return {
        "format": "busdx-model",
        "format_version": 1,
        "busdx_version": __version__,
        "environment": environment(),
        "model": asdict(config.model),
        "class_names": list(class_names),
        "positive_class": config.data.positive_class,
        "threshold": 0.5,
        "preprocessing": prep.to_dict(),
        "weights": {"name": weights.name, "sha256": weights.sha256},
        "config": config.to_dict(),
    }


def _save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def update_model_metadata(path: Path, updates: dict[str, Any]) -> None:
    """Rewrite a model file atomically with some metadata entries added or replaced."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    _save(path, {**payload, **updates})


def _write_history(path: Path, history: list[EpochRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(history[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(record) for record in history)
    atomic_write_text(path, buffer.getvalue())


def _load_last(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}); start a new run"
        ) from exc


Forward = Callable[[torch.Tensor], torch.Tensor]


def _inputs(
    config: Config,
    dataset: LabelledDataset,
    model: BinaryClassifier,
    prep: Preprocessing,
    weights: WeightsInfo,
    device: torch.device,
    progress: bool,
) -> tuple[Dataset, Dataset, Forward, Forward]:
    """Training set, validation set, and the forward functions (inputs -> logits) of each.

    * trainable backbone: images in, whole model;
    * (partly) frozen backbone: augmented images through the whole model, and the validation
      images through the frozen stem once (its output never changes);
    * frozen stem + feature cache: cached stem outputs of K augmented views, trainable layers
      and head only.
    """
    train, val = dataset.subset("train"), dataset.subset("val")
    if config.train.feature_cache:
        cache = FeatureCache.for_config(config, weights, prep)
        views = list(range(1, config.train.cache_views + 1))
        cache.fill(model, train, views, device=device, progress=progress)
        cache.fill(model, val, [0], device=device, progress=progress)
        cached = CachedFeatures(train, cache, views), CachedFeatures(val, cache, [0])
        return *cached, model.from_stem, model.from_stem
    train_set = ImageDataset(train, build_train_transform(prep, config.augment))
    val_set = ImageDataset(val, build_eval_transform(prep))
    if not model.backbone_frozen:
        return train_set, val_set, model, model
    loader = DataLoader(val_set, batch_size=config.train.batch_size)
    bar = tqdm(loader, desc="val features", disable=not progress, leave=False)
    return train_set, _stem_outputs(model, bar, device), model, model.from_stem


def fit(
    config: Config, dataset: LabelledDataset, run_dir: Path, *, progress: bool = True
) -> list[EpochRecord]:
    """Train on the train split, select on the val split, write checkpoints into ``run_dir``.

    If ``run_dir/last.pt`` exists, training resumes after its epoch. Returns the full history.
    """
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    model, weights, prep = create_model(config.model, image_size=config.data.image_size)
    prep = replace(prep, crop=config.data.crop, resize=config.data.resize,
                   annotations=config.data.annotations)  # fmt: skip
    model.to(device)
    metadata = model_metadata(config, weights, prep, dataset.class_names)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        trainable, lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
        if config.train.schedule == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    )
    criterion = nn.BCEWithLogitsLoss()

    history: list[EpochRecord] = []
    best_val_loss, stale_epochs, start_epoch = float("inf"), 0, 1
    last_path = run_dir / LAST_FILE
    if last_path.is_file():
        state = _load_last(last_path)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if "schedule" in state:
            schedule.load_state_dict(state["schedule"])
        history = [EpochRecord(**row) for row in state["history"]]
        best_val_loss, stale_epochs = state["best_val_loss"], state["stale_epochs"]
        start_epoch = state["epoch"] + 1
        logger.info("resuming %s after epoch %d", run_dir, state["epoch"])

    patience = config.train.early_stopping_patience
    if start_epoch > config.train.epochs or (patience and stale_epochs >= patience):
        return history  # nothing left to train
    train_set, val_set, forward, val_forward = _inputs(
        config, dataset, model, prep, weights, device, progress
    )
    batch, workers = config.train.batch_size, config.data.num_workers
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=workers)

    for epoch in range(start_epoch, config.train.epochs + 1):
        if patience and stale_epochs >= patience:
            logger.info("early stopping: no val-loss improvement in %d epochs", patience)
            break
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(config.train.seed, epoch))
        shuffle = torch.Generator().manual_seed(_epoch_seed(config.train.seed, epoch))
        if isinstance(train_set, CachedFeatures):
            train_set.set_epoch(epoch)
        train_loader = DataLoader(
            train_set, batch_size=batch, shuffle=True, generator=shuffle, num_workers=workers
        )
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{config.train.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        model.train()
        train_loss, train_acc = train_one_epoch(forward, bar, optimizer, criterion, device)
        schedule.step()
        model.eval()
        val_loss, val_acc = evaluate_epoch(val_forward, val_loader, criterion, device)
        record = EpochRecord(
            epoch, train_loss, train_acc, val_loss, val_acc, round(time.perf_counter() - started, 2)
        )
        history.append(record)

        improved = val_loss < best_val_loss
        if improved:
            best_val_loss, stale_epochs = val_loss, 0
            _save(
                run_dir / MODEL_FILE,
                {
                    **metadata,
                    "state_dict": model.state_dict(),
                    "epoch": epoch,
                    "val_loss": val_loss,
                },
            )
        else:
            stale_epochs += 1
        _save(
            last_path,
            {
                **metadata,
                "state_dict": model.state_dict(),
                "epoch": epoch,
                "val_loss": val_loss,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "history": [asdict(r) for r in history],
                "best_val_loss": best_val_loss,
                "stale_epochs": stale_epochs,
            },
        )
        _write_history(run_dir / HISTORY_FILE, history)
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  %.0fs%s",
            epoch,
            config.train.epochs,
            train_loss,
            train_acc,
            val_loss,
            val_acc,
            record.seconds,
            "  *best" if improved else "",
        )
    return history
