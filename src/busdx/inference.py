"""Load a trained model and predict the probability of malignancy for image files.

Two backends run the same network: ``torch`` reads ``model.pt`` with
``torch.load(..., weights_only=True)`` (an untrusted file cannot run code), ``onnx`` runs the
exported ``model.int8.onnx`` (or ``model.onnx``) with ONNX Runtime, several times faster on a
CPU (see ``busdx export``). Both carry the same metadata: preprocessing, class names,
threshold, temperature. Prediction streams: files are read batch by batch, and a file that
cannot be decoded yields an error row while the rest goes on.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from busdx.boxes import box_to_text, lookup_box
from busdx.dicom import count_frames, is_dicom_file
from busdx.errors import BoxError, ConfigError, DataError, ImageDecodeError
from busdx.fileio import atomic_path
from busdx.imaging import Box, ImageInput, InputLike, as_input, is_image_file, load_image
from busdx.predictor import Predictor
from busdx.scope import image_checks
from busdx.transforms import Preprocessing, region_of

__all__ = [
    "Prediction",
    "expand_paths",
    "file_logits",
    "file_predictions",
    "image_inputs",
    "iter_image_paths",
    "parse_frame",
    "parse_shard",
    "predict_files",
    "take_shard",
    "write_predictions",
]

logger = logging.getLogger(__name__)


def iter_image_paths(paths: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given plus image files found under given folders (recursively, sorted).

    Folders are walked lazily, one directory listing at a time, so a folder of any size
    streams in constant memory.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, subfolders, names in os.walk(path):
                subfolders.sort()
                for name in sorted(names):
                    if is_image_file(Path(name)):
                        yield Path(folder) / name
        elif path.exists():
            yield path
        else:
            raise DataError(f"{path} does not exist")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` (I from 0 to N - 1) as (I, N); None is the whole list, (0, 1)."""
    if shard is None:
        return 0, 1
    index, sep, count = shard.partition("/")
    if sep and index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 for the first of 4 jobs), "
                      f"got {shard!r}")  # fmt: skip


def take_shard(files: Iterable[Path], shard: tuple[int, int]) -> Iterator[Path]:
    """Every N-th file, starting at the I-th, of ``shard`` = (I, N): the jobs of an array
    with I = 0 .. N - 1 share the files out exactly, each file to one job."""
    index, count = shard
    return (path for position, path in enumerate(files) if position % count == index)


def image_inputs(
    files: Iterable[Path],
    *,
    frame: str = "0",
    box: Box | None = None,
    boxes: dict[str, Box] | None = None,
) -> Iterator[ImageInput]:
    """What to predict for each file: its DICOM ``frame`` (a number, or ``"all"``: one input
    per frame; other files have one image), and its lesion box: ``box`` for every file, or
    each file's entry in a ``boxes`` table (:func:`busdx.boxes.read_boxes_csv`)."""
    for path in files:
        chosen = box if boxes is None else lookup_box(boxes, path)
        if not is_dicom_file(path):
            yield ImageInput(path, 0, chosen)
        elif frame != "all":
            yield ImageInput(path, int(frame), chosen)
        else:
            try:
                count = count_frames(path)
            except ImageDecodeError:
                count = 1  # the error is reported when the file is read
            yield from (ImageInput(path, number, chosen) for number in range(count))


def parse_frame(frame: str) -> str:
    """``--frame``: a frame number (0 is the first) or ``all``."""
    if frame == "all" or frame.isdigit():
        return frame
    raise ConfigError(f"--frame must be a frame number (0 is the first) or all, got {frame!r}")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """:func:`iter_image_paths` as a list (an error for a missing path comes first)."""
    return list(iter_image_paths(paths))


PREDICTION_FIELDS = [
    "path",
    "frame",
    "box",
    "probability_malignant",
    "label",
    "threshold",
    "out_of_scope",
    "scope_reason",
    "error",
]


@dataclass
class Prediction:
    """One output row: a probability and label, or the reason there is none."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    logit: float | None = None  # before temperature scaling
    out_of_scope: bool | None = None  # unlike the training images (None: no guard)
    scope_reason: str | None = None
    scope_distance: float | None = None
    frame: int | None = None  # the DICOM frame (None: not a DICOM file)
    box: Box | None = None  # the lesion box the model looked at (ROI models)

    def to_dict(self) -> dict[str, Any]:
        """The row as written by ``busdx predict`` (keys: ``PREDICTION_FIELDS``)."""
        prob = None if self.probability is None else round(self.probability, 6)
        return {
            "path": self.path,
            "frame": self.frame,
            "box": box_to_text(self.box),
            "probability_malignant": prob,
            "label": self.label,
            "threshold": self.threshold,
            "out_of_scope": self.out_of_scope,
            "scope_reason": self.scope_reason,
            "error": self.error,
        }


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _DecodedBatches(IterableDataset):
    """Batches of files, decoded, checked and preprocessed, for a DataLoader.

    Loader worker ``w`` of ``W`` prepares batches ``w``, ``w + W``, ...; the DataLoader takes
    from its workers in turn, so the batches come back in file order. Each worker walks the
    file list itself (a folder listing is cheap next to decoding).
    """

    def __init__(
        self, files: Iterable[InputLike], batch_size: int, transform: Callable,
        prep: Preprocessing,
    ) -> None:  # fmt: skip
        self.files = files
        self.batch_size = batch_size
        self.transform = transform
        self.prep = prep

    def __iter__(self) -> Iterator[tuple[list[Any], list[str | None], torch.Tensor, list]]:
        worker = get_worker_info()
        rank, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for number, batch in enumerate(_batches(self.files, self.batch_size)):
            if number % workers == rank:
                yield self._prepare(batch)

    def _prepare(
        self, batch: list[InputLike]
    ) -> tuple[list[tuple], list[str | None], torch.Tensor, list]:
        errors: list[str | None] = []
        inputs, checks, described = [], [], []
        for item in map(as_input, batch):
            try:
                image = load_image(item.path, frame=item.frame)
                region = region_of(image, item.box, self.prep, name=item.name)
            except (ImageDecodeError, BoxError) as exc:
                errors.append(str(exc))
            else:
                errors.append(None)
                inputs.append(self.transform(region))
                checks.append(image_checks(image))  # is the whole image a scan?
            frame = item.frame if item.frame or is_dicom_file(item.path) else None
            described.append((str(item.path), frame, item.box))
        stacked = torch.stack(inputs) if inputs else torch.empty(0)
        return described, errors, stacked, checks


def predict_files(
    loaded: Predictor,
    files: Iterable[InputLike],
    *,
    batch_size: int = 16,
    progress: bool = True,
    threshold: float | None = None,
    total: int | None = None,
    workers: int = 0,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per file, in order, batch by batch.

    ``files`` may be any iterable of paths (e.g. :func:`iter_image_paths`) or
    :class:`~busdx.imaging.ImageInput` (a DICOM frame, a lesion box); ``workers`` loader
    processes (0: this one) decode and preprocess the next batches while the model scores the
    current one, and only those few batches are held in memory. ``total`` sizes the progress
    bar when ``files`` has no length.
    """
    threshold = loaded.threshold if threshold is None else threshold
    total = len(files) if total is None and isinstance(files, Sized) else total
    bar = tqdm(total=total, unit="img", desc="predict", disable=not progress, leave=False)
    loader = DataLoader(
        _DecodedBatches(files, batch_size, loaded.transform, loaded.preprocessing),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=loaded.device.type == "cuda",
    )
    for described, errors, inputs, checks in loader:
        decisions = iter(loaded.decide_inputs(inputs, checks, threshold) if len(inputs) else [])
        for (path, frame, box), error in zip(described, errors, strict=True):
            row = Prediction(path, None, None, threshold, error=error, frame=frame, box=box)
            if error is None:
                decision = next(decisions)
                row.logit, row.probability, row.label = (
                    decision.logit,
                    decision.probability,
                    decision.label,
                )
                row.scope_distance = decision.scope_distance
                row.out_of_scope, row.scope_reason = decision.out_of_scope, decision.scope_reason
            else:
                logger.warning("%s", error)
            bar.update()
            yield row
    bar.close()


def file_predictions(
    loaded: Predictor, files: Sequence[InputLike], *, progress: bool = True
) -> list[Prediction]:
    """One prediction per file, in order; all files must be readable (labelled data)."""
    rows = list(predict_files(loaded, files, progress=progress))
    failed = [row.error for row in rows if row.error]
    if failed:
        raise DataError(f"{len(failed)} evaluation image(s) could not be read, e.g. {failed[0]}")
    return rows


def file_logits(
    loaded: Predictor, files: Sequence[InputLike], *, progress: bool = True
) -> np.ndarray:
    """Raw logit (before temperature scaling) of each file, in order; all must be readable."""
    return np.array([row.logit for row in file_predictions(loaded, files, progress=progress)])


def write_predictions(rows: Iterable[Prediction], out: str | Path | None) -> tuple[int, int]:
    """Stream rows to ``out`` (.csv or .json, written atomically) or CSV on stdout.

    Returns (rows written, rows with an error). Memory stays constant in the number of rows.
    """
    suffix = Path(out).suffix.lower() if out else ".csv"
    with contextlib.ExitStack() as stack:
        if out:
            tmp = stack.enter_context(atomic_path(out))
            handle = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        else:
            handle = sys.stdout
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_FIELDS, lineterminator="\n")
        handle.write("[" if suffix == ".json" else "")
        count = failed = 0
        for row in rows:
            record = row.to_dict()
            if suffix == ".json":
                handle.write(("," if count else "") + "\n  " + json.dumps(record))
            else:
                if not count:
                    writer.writeheader()
                writer.writerow(record)
            count, failed = count + 1, failed + (row.error is not None)
        handle.write("\n]\n" if suffix == ".json" else "")
    return count, failed
