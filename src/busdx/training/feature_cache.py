"""Disk cache of frozen-backbone outputs, one file per (image, augmented view).

With a frozen backbone, the recipe's 30 epochs repeat 30 full VGG16 forward passes per image.
Caching the backbone output of K augmented views per image once (view 0 is the plain eval
image) and training the head on the cache gives the same model family for a fraction of the
cost, and the cache is shared by every run and cross-validation fold that uses the same images,
weights, preprocessing and augmentation.

Each entry is a ``.npy`` file (memory-mapped when read) under a folder named by a fingerprint of
model, weights sha256, preprocessing and, for augmented views, the augmentation settings and seed;
changing any of these starts a new folder, so stale features are never read. Files are written
atomically: a kill leaves complete entries or none. The cache lives in ``$BUSDX_CACHE_DIR`` or
``$XDG_CACHE_HOME/busdx/features`` (default ``~/.cache/busdx/features``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from busdx.config import AugmentConfig, Config
from busdx.data.datasets import Sample
from busdx.data.imaging import load_image
from busdx.data.preprocess import Preprocessing
from busdx.devices import autocast
from busdx.distributed import current_world
from busdx.fileio import atomic_path
from busdx.networks.classifier import BinaryClassifier, WeightsInfo
from busdx.training.loading import make_loader
from busdx.training.transforms import build_eval_transform, build_train_transform

__all__ = ["CACHE_ENV_VAR", "CachedFeatures", "FeatureCache", "default_cache_dir"]

CACHE_ENV_VAR = "BUSDX_CACHE_DIR"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$BUSDX_CACHE_DIR``, else ``$XDG_CACHE_HOME/busdx/features``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache / "busdx" / "features"


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """Backbone features of images under one model, weights, preprocessing and augmentation."""

    def __init__(
        self,
        *,
        model_name: str,
        weights_sha256: str | None,
        trainable_blocks: int = 0,
        preprocessing: Preprocessing,
        augment: AugmentConfig,
        seed: int,
        precision: str = "fp32",
        root: Path | None = None,
    ) -> None:
        if weights_sha256 is None:
            raise ValueError("caching needs reproducible backbone weights (not --weights none)")
        base = {
            "format": FORMAT_VERSION,
            "model": model_name,
            "weights": weights_sha256,
            "preprocessing": preprocessing.to_dict(),
        }
        if trainable_blocks:  # a shorter stem (the whole backbone keeps its original key)
            base["trainable_blocks"] = trainable_blocks
        if precision != "fp32":  # features computed in bf16 / fp16 differ slightly
            base["precision"] = precision
        self.root = root or default_cache_dir()
        self.eval_key = _fingerprint(base)
        self.augment_key = _fingerprint({**base, "augment": augment.model_dump(), "seed": seed})
        self.preprocessing = preprocessing
        self.augment = augment
        self.seed = seed
        self.precision = precision

    @classmethod
    def for_config(cls, config: Config, weights: WeightsInfo, prep: Preprocessing) -> FeatureCache:
        """The cache of a run's model, weights, preprocessing, augmentation and seed."""
        return cls(model_name=config.model.name, weights_sha256=weights.sha256,
                   trainable_blocks=config.model.trainable_blocks, preprocessing=prep,
                   augment=config.augment, seed=config.train.seed,
                   precision=config.train.precision)  # fmt: skip

    def path(self, sample: Sample, view: int) -> Path:
        """Where the features of ``sample`` under ``view`` (0: no augmentation) are stored."""
        key = self.eval_key if view == 0 else self.augment_key
        return self.root / key / sample.sha256[:2] / f"{sample.sha256}-{view}.npy"

    def view_image(self, sample: Sample, view: int) -> torch.Tensor:
        """The network input of ``sample`` under ``view``: the eval image for view 0, else an
        augmentation seeded by (image, view, seed), the same in any process."""
        image = load_image(sample.path)
        if view == 0:
            return self._eval_transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample.sha256[:12], 16) + 1_000_003 * view + self.seed)
            return self._train_transform(image)

    @functools.cached_property
    def _eval_transform(self) -> Callable:
        return build_eval_transform(self.preprocessing)

    @functools.cached_property
    def _train_transform(self) -> Callable:
        return build_train_transform(self.preprocessing, self.augment)

    @torch.inference_mode()
    def fill(
        self,
        model: BinaryClassifier,
        samples: Sequence[Sample],
        views: Sequence[int],
        *,
        device: torch.device,
        batch_size: int = 32,
        workers: int = 0,
        progress: bool = True,
    ) -> int:
        """Compute and store every missing (sample, view) entry, images decoded and augmented
        by ``workers`` loader processes; returns how many were new. Under torchrun each
        process fills its share (the caller waits for all of them)."""
        world = current_world()
        missing = [(s, v) for s in samples for v in views if not self.path(s, v).is_file()]
        share = missing[world.rank :: world.size]
        loader = make_loader(_Views(self, share), batch_size=batch_size, workers=workers,
                             device=device)  # fmt: skip
        bar = tqdm(total=len(missing), desc="feature cache", unit="view", disable=not progress)
        for images, positions in loader:
            with autocast(device, self.precision):
                features = model.stem(images.to(device, non_blocking=True))
            for position, array in zip(positions.tolist(), features.float().cpu().numpy(),
                                       strict=True):  # fmt: skip
                target = self.path(*share[position])
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                    np.save(handle, array)
            bar.update(len(positions) * world.size)
        bar.close()
        return len(share)

    def load(self, sample: Sample, view: int) -> np.ndarray:
        """Memory-mapped features of one entry."""
        return np.load(self.path(sample, view), mmap_mode="r")


class _Views(Dataset):
    """(network input, position) of (sample, view) entries, for :meth:`FeatureCache.fill`."""

    def __init__(self, cache: FeatureCache, entries: Sequence[tuple[Sample, int]]) -> None:
        self.cache = cache
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.cache.view_image(*self.entries[position]), position


class CachedFeatures(Dataset):
    """(features, label) pairs from the cache. Items asked for by ``(epoch, index)`` keys (see
    :class:`busdx.data.datasets.EpochSampler`) cycle through the augmented views: epoch 1 reads the
    first, epoch 2 the second, and so on; items asked for by index read the first view."""

    def __init__(
        self, samples: Sequence[Sample], cache: FeatureCache, views: Sequence[int]
    ) -> None:
        self.samples = list(samples)
        self.cache = cache
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (1, key)
        sample = self.samples[index]
        view = self.views[(epoch - 1) % len(self.views)]
        return torch.from_numpy(np.array(self.cache.load(sample, view))), sample.label
