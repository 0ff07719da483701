"""Predict the probability of malignancy for image files with a loaded model.

:func:`predict_images` is ``busdx predict``: it loads the model (:func:`busdx.inference.predictor.
load_model`), selects the inputs (:class:`busdx.data.inputs.InputSelection`), predicts, writes
Grad-CAM overlays if asked and the rows to a file. Prediction streams: files are read batch by
batch, and a file that cannot be decoded yields an error row while the rest goes on.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from busdx.data.boxes import box_to_text
from busdx.data.dicom import is_dicom_file
from busdx.data.imaging import Box, ImageInput, InputLike, as_input, load_image
from busdx.data.inputs import InputSelection
from busdx.data.preprocess import Preprocessing, load_region, normalize, prepare, region_of
from busdx.errors import BoxError, ConfigError, DataError, ImageDecodeError
from busdx.fileio import atomic_path
from busdx.hardware import resolve_workers
from busdx.inference.predictor import Decision, Predictor, load_model
from busdx.inference.scope import image_checks
from busdx.lesion.descriptors import LESION_FIELDS, Lesion, lesion_fields
from busdx.lesion.outline import RegionView, lesion_from_mask, region_view

__all__ = [
    "PredictSummary",
    "Prediction",
    "file_logits",
    "file_predictions",
    "predict_files",
    "predict_images",
    "write_explanations",
    "write_predictions",
]

logger = logging.getLogger(__name__)


PREDICTION_FIELDS = [
    "path",
    "frame",
    "box",
    "probability_malignant",
    "label",
    "threshold",
    "likelihood_category",
    "out_of_scope",
    "scope_reason",
    *LESION_FIELDS,
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
    out_of_scope: bool | None = None  # not a B-mode scan (busdx.inference.scope.image_checks)
    scope_reason: str | None = None
    scope_distance: float | None = None
    frame: int | None = None  # the DICOM frame (None: not a DICOM file)
    box: Box | None = None  # the lesion box the model looked at (ROI models)
    likelihood_category: str | None = None  # see busdx.stats.likelihood (calibrated models)
    lesion: Lesion | None = None  # outline, size and descriptors (mask-head models)

    def summary(self) -> str:
        """One line for a terminal: the probability, the label (or why there is none), the
        likelihood category and the lesion."""
        if self.error is not None:
            return f"error: {self.error}"
        said = [
            f"p(malignant)={self.probability:.3f}" + (f" -> {self.label}" if self.label else "")
        ]
        if self.likelihood_category:
            said.append(f"likelihood category {self.likelihood_category}")
        if self.out_of_scope:
            said.append(
                f"out of scope ({self.scope_reason})" + ("" if self.label else ": no label")
            )
        elif self.out_of_scope is False:
            said.append("in scope")
        if self.lesion is not None:
            said.append(f"lesion {self.lesion.summary()}")
        return "; ".join(said)

    def to_dict(self, *, outline: bool = False) -> dict[str, Any]:
        """The row as written by ``busdx predict`` (keys: ``PREDICTION_FIELDS``, and with
        ``outline`` the lesion's outline as ``[[x, y], ...]`` in image pixels)."""
        prob = None if self.probability is None else round(self.probability, 6)
        row = {
            "path": self.path,
            "frame": self.frame,
            "box": box_to_text(self.box),
            "probability_malignant": prob,
            "label": self.label,
            "threshold": self.threshold,
            "likelihood_category": self.likelihood_category,
            "out_of_scope": self.out_of_scope,
            "scope_reason": self.scope_reason,
            **lesion_fields(self.lesion),
            "error": self.error,
        }
        if outline:
            row["lesion_outline"] = None if self.lesion is None else self.lesion.outline
        return row


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Batch:
    """Files decoded, checked and preprocessed (up to the resize: uint8, N x H x W x 3)."""

    described: list[tuple]  # (path, frame, box) per file
    errors: list[str | None]  # per file: why it could not be read (None: it could)
    pixels: np.ndarray
    checks: list[list[str]]  # per readable file: busdx.inference.scope.image_checks
    views: list[RegionView]  # per readable file, for a model that outlines


def _prepare_batch(
    batch: list[InputLike], prep: Preprocessing, views: bool,
    spacing: tuple[float, float] | None,
) -> _Batch:  # fmt: skip
    prepared = _Batch([], [], np.empty((0, prep.image_size, prep.image_size, 3), np.uint8), [], [])
    pixels = []
    for item in map(as_input, batch):
        try:
            image = load_image(item.path, frame=item.frame)
            region = region_of(image, item.box, prep, name=item.name)
        except (ImageDecodeError, BoxError) as exc:
            prepared.errors.append(str(exc))
        else:
            prepared.errors.append(None)
            pixels.append(prepare(region, prep))
            prepared.checks.append(image_checks(image))  # is the whole image a scan?
            if views:
                prepared.views.append(region_view(image, item.box, prep, spacing))
        frame = item.frame if item.frame or is_dicom_file(item.path) else None
        prepared.described.append((str(item.path), frame, item.box))
    if pixels:
        prepared.pixels = np.stack(pixels)
    return prepared


def _prepared_batches(
    files: Iterable[InputLike], batch_size: int, workers: int, prep: Preprocessing,
    views: bool, spacing: tuple[float, float] | None,
) -> Iterator[_Batch]:  # fmt: skip
    """Batches of files prepared in order; with ``workers`` processes, the next
    ``2 * workers`` batches are prepared while the model scores this one (no more: memory
    stays bounded however many files there are)."""
    prepare_batch = functools.partial(_prepare_batch, prep=prep, views=views, spacing=spacing)
    if not workers:
        yield from map(prepare_batch, _batches(files, batch_size))
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for batch in _batches(files, batch_size):
            pending.append(pool.submit(prepare_batch, batch))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def predict_files(
    loaded: Predictor,
    files: Iterable[InputLike],
    *,
    batch_size: int = 16,
    progress: bool = True,
    threshold: float | None = None,
    total: int | None = None,
    workers: int = 0,
    label_out_of_scope: bool = False,
    spacing: tuple[float, float] | None = None,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per file, in order, batch by batch.

    ``files`` may be any iterable of paths (e.g. :func:`iter_image_paths`) or
    :class:`~busdx.data.imaging.ImageInput` (a DICOM frame, a lesion box); ``workers`` loader
    processes (0: this one) decode and preprocess the next batches while the model scores the
    current one, and only those few batches are held in memory. ``total`` sizes the progress
    bar when ``files`` has no length. An out-of-scope input has no label unless
    ``label_out_of_scope``. A model with a mask head also outlines and measures each lesion
    (in mm with ``spacing``, the pixel size, unless the file carries its own).
    """
    threshold = loaded.threshold if threshold is None else threshold
    total = len(files) if total is None and isinstance(files, Sized) else total
    bar = tqdm(total=total, unit="img", desc="predict", disable=not progress, leave=False)
    prep = loaded.preprocessing
    for batch in _prepared_batches(files, batch_size, workers, prep, loaded.outlines, spacing):
        inputs = normalize(batch.pixels, prep)
        decided = loaded.decide_inputs(
            inputs, batch.checks, threshold, label_out_of_scope=label_out_of_scope
        )
        decisions, regions = iter(decided), iter(batch.views)
        for (path, frame, box), error in zip(batch.described, batch.errors, strict=True):
            row = Prediction(path, None, None, threshold, error=error, frame=frame, box=box)
            if error is None:
                _fill(row, next(decisions), next(regions, None), loaded.preprocessing)
            else:
                logger.warning("%s", error)
            bar.update()
            yield row
    bar.close()


def _fill(
    row: Prediction, decision: Decision, view: RegionView | None, prep: Preprocessing
) -> None:
    row.logit, row.probability, row.label = decision.logit, decision.probability, decision.label
    row.likelihood_category = decision.likelihood_category
    row.scope_distance = decision.scope_distance
    row.out_of_scope, row.scope_reason = decision.out_of_scope, decision.scope_reason
    if decision.mask is not None and view is not None:
        row.lesion = lesion_from_mask(decision.mask, view, prep)


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
            record = row.to_dict(outline=suffix == ".json")
            if suffix == ".json":
                handle.write(("," if count else "") + "\n  " + json.dumps(record))
            else:
                if not count:
                    writer.writeheader()
                writer.writerow(record)
            count, failed = count + 1, failed + (row.error is not None)
        handle.write("\n]\n" if suffix == ".json" else "")
    return count, failed


def write_explanations(
    rows: Iterable[Prediction], explainer: Predictor, out: str | Path
) -> Iterator[Prediction]:
    """Pass rows through, writing a Grad-CAM overlay for each readable image into ``out``
    (``<row>-<stem>-gradcam.png``); ``explainer`` is a torch-backend model."""
    from busdx.networks.gradcam import (
        explain_image,  # Grad-CAM needs torch: imported when asked for
    )

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for index, row in enumerate(rows):
        if row.error is None:
            item = ImageInput(Path(row.path), row.frame or 0, row.box)
            explanation = explain_image(explainer, load_region(item, explainer.preprocessing))
            target = folder / f"{index:05d}-{Path(row.path).stem}-gradcam.png"
            with atomic_path(target) as tmp:
                explanation.overlay.save(tmp, format="PNG")
        yield row


def _dicom_results(
    rows: Iterable[Prediction], out: Path, loaded: Predictor
) -> Iterable[Prediction]:
    try:
        from busdx.pacs.dicom_out import model_identity, write_dicom_results
    except ImportError as exc:  # highdicom: the pacs extra
        raise ConfigError(
            f"--dicom-out needs {exc.name}, which this install leaves out: "
            "pip install 'busdx[pacs]'"
        ) from exc
    return write_dicom_results(rows, out, model_identity(loaded))


@dataclass(frozen=True)
class PredictSummary:
    """What :func:`predict_images` did."""

    predicted: int
    failed: int
    seconds: float
    backend: str
    model_file: str


def predict_images(
    run: str | Path,
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    selection: InputSelection = InputSelection(),  # noqa: B008 (frozen: safe to share)
    device: str = "auto",
    backend: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    workers: int = -1,
    explain: str | Path | None = None,
    progress: bool = True,
    label_out_of_scope: bool = False,
    pixel_size: float | None = None,
    dicom_out: str | Path | None = None,
) -> PredictSummary:
    """``busdx predict``: the images under ``paths`` through the model of ``run``, written to
    ``out`` (.csv or .json; None: CSV on stdout), with Grad-CAM overlays in ``explain``.

    ``selection`` picks the images (shard), DICOM frames and lesion boxes; ``workers`` decode
    the next images while the model runs (-1: automatic). An unreadable file is an error row,
    never the end of the batch. See :func:`predict_files` for ``label_out_of_scope``;
    ``pixel_size`` (mm) measures a mask-head model's lesions in mm. ``dicom_out``: a folder for
    each DICOM frame's Structured Report and Segmentation
    (:func:`busdx.pacs.dicom_out.write_dicom_results`).
    """
    started = time.perf_counter()
    loaded = load_model(run, device=device, backend=backend, threads=threads, precision=precision)
    roi_model = loaded.preprocessing.region == "box"
    total = sum(1 for _ in selection.inputs(paths, roi_model=roi_model))
    if not total:
        raise DataError(f"no image files found in {', '.join(map(str, paths))}")
    if selection.box and total > 1:
        raise ConfigError(
            f"--box is one image's lesion box, but {total} images were given; "
            "use --boxes FILE (path,x,y,w,h) for several"
        )
    rows = predict_files(
        loaded,
        selection.inputs(paths, roi_model=roi_model),
        total=total,
        batch_size=batch_size,
        threshold=threshold,
        workers=resolve_workers(workers),
        progress=progress,
        label_out_of_scope=label_out_of_scope,
        spacing=None if pixel_size is None else (pixel_size, pixel_size),
    )
    if explain:
        explainer = loaded if loaded.model is not None else load_model(run, device=device)
        rows = write_explanations(rows, explainer, explain)
    if dicom_out:
        rows = _dicom_results(rows, Path(dicom_out), loaded)
    count, failed = write_predictions(rows, out)
    seconds = time.perf_counter() - started
    return PredictSummary(count - failed, failed, seconds, loaded.backend, loaded.path.name)
