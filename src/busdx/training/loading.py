"""Feeding images to torch: samplers, datasets and loaders for training and feature caching.

:class:`EpochSampler` shares out each epoch's indices among processes (torchrun) with a seed
per (seed, epoch), so a resumed run draws exactly what it would have; :class:`ImageDataset`
decodes, augments and normalises samples (decoding each image once into memory when they fit);
:func:`make_loader` wraps them in a DataLoader sized for this machine.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from busdx.data.datasets import Sample
from busdx.data.imaging import load_image
from busdx.data.preprocess import Preprocessing, load_region, load_region_and_mask

__all__ = [
    "EpochSampler",
    "ImageDataset",
    "item_seed",
    "make_loader",
    "read_sample",
    "site_balanced_weights",
]

logger = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """This process's share of a dataset's indices for one epoch, as ``(epoch, index)`` keys.

    The order is :class:`~torch.utils.data.DistributedSampler`'s (a permutation seeded by
    ``seed + epoch``, dealt round-robin to ``world_size`` processes, padded to equal shares), so
    one process and N processes see the same global batches. With ``weights`` (one per image,
    e.g. from :func:`site_balanced_weights`) an epoch is instead as many draws with replacement,
    in proportion to them, seeded the same way and dealt out alike. The epoch travels with each
    index to :class:`ImageDataset`, which seeds the image's augmentation with it, in whichever
    worker process the image lands.
    """

    def __init__(
        self, dataset: Dataset, *, seed: int, shuffle: bool = True, rank: int = 0,
        world_size: int = 1, weights: Sequence[float] | None = None,
    ) -> None:  # fmt: skip
        self.order = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order (and augmentation) of ``epoch``; call it before each epoch."""
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def _indices(self) -> Iterable[int]:
        if self.weights is None:
            return self.order
        generator = torch.Generator().manual_seed(self.order.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.order.total_size, replacement=True,
                                  generator=generator).tolist()  # fmt: skip
        return drawn[self.order.rank : self.order.total_size : self.order.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self._indices())


def site_balanced_weights(samples: Sequence[Sample]) -> list[float]:
    """A sampling weight per sample, so that each site is drawn equally often."""
    counts = Counter(s.site for s in samples)
    return [1.0 / counts[s.site] for s in samples]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for one image in one epoch. (torch's CPU generator keeps only
    the low 32 bits of a seed, so a seed built by shifting the epoch above them would give an
    image the same augmentation in every epoch.)"""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Decode, transform and label a list of samples for a DataLoader.

    ``decode`` is the deterministic part of the preprocessing (PIL image -> uint8 tensor, see
    :func:`busdx.training.transforms.build_decode_transform`), ``transform`` the rest (augmentation
    and normalization). An item is asked for by index, or by an ``(epoch, index)`` key from
    :class:`EpochSampler`: its random transform is then seeded by (``seed``, epoch, index), so
    an image is augmented the same way whatever the number of workers or processes, and a
    resumed run repeats the epochs it redoes exactly.

    ``read`` turns a :class:`~busdx.data.datasets.Sample` into a PIL image (default: the whole
    image; :func:`busdx.data.preprocess.load_region` crops to the lesion box in ROI mode);
    ``random_read`` says it draws random numbers (a jittered box), so it is seeded with the
    transform and its results are never preloaded.

    With ``masks`` (a mask head to train), ``read`` gives the lesion mask as the image's alpha
    channel (:func:`busdx.data.preprocess.load_region_and_mask`), ``transform`` returns
    ``(image, mask)`` (:class:`busdx.training.transforms.SplitMask`), and an item is
    ``(image, label, mask, has_mask)``: a sample without a mask file has ``has_mask`` 0, and
    trains the classifier only.

    :meth:`preload` decodes every image once into one shared-memory tensor, read by all
    workers, instead of decoding each image every epoch.
    """

    def __init__(
        self, samples: Sequence[Sample], decode: Callable, transform: Callable, *,
        seed: int = 0, read: Callable[[Sample], Image.Image] | None = None,
        random_read: bool = False, masks: bool = False,
    ) -> None:  # fmt: skip
        self.samples = list(samples)
        self.decode = decode
        self.transform = transform
        self.seed = seed
        self.read = read or _read_whole
        self.random_read = random_read
        self.masks = masks
        self.decoded: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _decoded(self, index: int) -> torch.Tensor:
        if self.decoded is not None:
            return self.decoded[index]
        return self.decode(self.read(self.samples[index]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if epoch is None:
            return self._item(index)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is untouched
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self._item(index)

    def _item(self, index: int) -> tuple:
        sample = self.samples[index]
        if not self.masks:
            return self.transform(self._decoded(index)), sample.label
        image, mask = self.transform(self._decoded(index))
        return image, sample.label, mask, float(bool(sample.masks))

    def preload(self, *, image_size: int, limit_mb: int, workers: int = 0,
                progress: bool = False) -> bool:  # fmt: skip
        """Decode every image once into shared memory, with ``workers`` processes; skipped
        (False) when the images would take more than ``limit_mb`` megabytes."""
        channels = 4 if self.masks else 3  # RGB (+ the lesion mask)
        size = len(self) * channels * image_size**2
        if self.random_read or self.decoded is not None or not self or size > limit_mb * 2**20:
            return self.decoded is not None
        decoded = torch.empty((len(self), channels, image_size, image_size), dtype=torch.uint8)
        loader = make_loader(_Decoded(self), batch_size=32, workers=workers)
        for indices, images in tqdm(loader, desc="decode", unit="batch", disable=not progress,
                                    leave=False):  # fmt: skip
            decoded[indices] = images
        self.decoded = decoded.share_memory_()
        return True


def _read_whole(sample: Sample) -> Image.Image:
    return load_image(sample.path)


class _Decoded(Dataset):
    """(index, decoded uint8 image) pairs of an :class:`ImageDataset`, to preload it."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.images._decoded(index)


def make_loader(
    dataset: Dataset, *, batch_size: int, sampler: Iterable | None = None, workers: int = 0,
    device: torch.device | None = None,
) -> DataLoader:  # fmt: skip
    """A DataLoader that keeps a device fed: ``workers`` persistent worker processes, each with
    a few batches in flight, and page-locked (pinned) memory for fast copies to a GPU.

    It draws its worker seeds from a generator of its own, not from the global random stream,
    so dropout does not depend on how many loaders were started, or when.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        pin_memory=device is not None and device.type == "cuda",
    )


def read_sample(
    sample: Sample, prep: Preprocessing, jitter: float = 0.0, masks: bool = False
) -> Image.Image:
    """A sample's image as the model sees it (with its lesion mask as alpha for a mask head)."""
    if masks:
        return load_region_and_mask(sample.input, sample.masks, prep, jitter=jitter)
    return load_region(sample.input, prep, jitter=jitter)
