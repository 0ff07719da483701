"""Batch prediction on a Ray cluster: millions of images through the exported ONNX model.

:func:`predict_on_ray` lists the images on the driver, hands them to Ray Data, and lets a pool
of model actors (``map_batches`` with an :class:`~ray.data.ActorPoolStrategy`; each loads the
run's int8 ONNX model once) decode and score them with the same code as ``busdx predict``:
one bad file gives an error row, never a failed job. Results stream back to the driver, which
writes them in parts, each atomically, into ``OUT.parts/``; a re-run skips every image already
in a part (resumable after a crash, idempotent when complete) and the parts are merged, in the
images' order, into ``OUT`` (.csv or .parquet). Ray schedules, retries and scales; busdx adds
no scheduling of its own.

The images, and the run directory, must be readable at the same paths on every node (a shared
filesystem), and busdx installed there: ``pip install "busdx[ray]"``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from busdx.data.inputs import iter_image_paths
from busdx.errors import ConfigError, DataError
from busdx.fileio import atomic_path, atomic_write_text
from busdx.inference.batch import PREDICTION_FIELDS, predict_files
from busdx.inference.predictor import load_model

__all__ = ["RayPredictSummary", "predict_on_ray"]

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".parquet")
PART_ROWS = 1000  # rows per part file: what a crash can cost


@dataclass
class RayPredictSummary:
    """What a :func:`predict_on_ray` call did."""

    predicted: int  # images scored by this call
    skipped: int  # images already in OUT.parts/ from an earlier call
    failed: int  # error rows in the merged output
    seconds: float


class _Scorer:
    """A Ray Data actor: loads the ONNX model once, then scores batches of paths."""

    def __init__(self, model: str, threshold: float | None) -> None:
        self.predictor = load_model(model, backend="onnx", threads=1)
        self.threshold = threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        paths = [Path(path) for path in batch["path"]]
        predictions = predict_files(
            self.predictor, paths, batch_size=len(paths), threshold=self.threshold, progress=False
        )
        rows = [row.to_dict() for row in predictions]
        # the text ``busdx predict`` writes, column by column (None as an empty cell)
        return {field: ["" if row[field] is None else str(row[field]) for row in rows]
                for field in PREDICTION_FIELDS}  # fmt: skip


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError('--ray needs Ray: pip install "busdx[ray]"') from exc
    return ray


def _read_parts(folder: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for part in sorted(folder.glob("part-*.csv")):
        with part.open(newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _write_part(folder: Path, rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns() % 10**9:09d}.csv"
    atomic_write_text(folder / name, buffer.getvalue())


def _merge(rows: list[dict[str, str]], order: dict[str, int], out: Path) -> None:
    """All rows, in the images' order, into ``out`` (.csv, or .parquet with typed columns)."""
    rows = sorted((row for row in rows if row["path"] in order), key=lambda r: order[r["path"]])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if out.suffix == ".csv":
        atomic_write_text(out, buffer.getvalue())
        return
    import pyarrow.csv
    import pyarrow.parquet

    table = pyarrow.csv.read_csv(io.BytesIO(buffer.getvalue().encode()))
    with atomic_path(out) as tmp:
        pyarrow.parquet.write_table(table, tmp)


def predict_on_ray(
    run: str | Path,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = "local",
    workers: int = 2,
    batch_size: int = 32,
    threshold: float | None = None,
    progress: bool = True,
) -> RayPredictSummary:
    """Predict every image under ``paths`` with the exported ONNX model of ``run`` on Ray.

    ``address`` ``"local"`` starts a Ray instance on this machine with ``workers`` CPUs and
    stops it afterwards; any other value (``auto``, ``ray://head:10001``) joins that cluster.
    ``workers`` model actors of one CPU each score batches of ``batch_size`` images. Returns a
    :class:`RayPredictSummary`; results are in ``out`` (see the module docstring).
    """
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end in .csv or .parquet for --ray, got {out.name!r}")
    if workers < 1:
        raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
    model = load_model(run, backend="onnx").path  # checked here, before any cluster work
    files = [str(path) for path in iter_image_paths(paths)]
    if not files:
        raise DataError(f"no image files found in {', '.join(map(str, paths))}")
    order = {path: position for position, path in enumerate(files)}
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    done = {row["path"] for row in _read_parts(parts)}
    todo = [path for path in files if path not in done]
    started = time.perf_counter()
    if todo:
        _score_on_ray(model, todo, parts, address, workers, batch_size, threshold, progress)
    rows = _read_parts(parts)
    _merge(rows, order, out)
    failed = sum(1 for row in rows if row["path"] in order and row["error"])
    return RayPredictSummary(len(todo), len(files) - len(todo), failed,
                             time.perf_counter() - started)  # fmt: skip


def _score_on_ray(
    model: Path,
    todo: list[str],
    parts: Path,
    address: str | None,
    workers: int,
    batch_size: int,
    threshold: float | None,
    progress: bool,
) -> None:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here and address in (None, "local"):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    elif started_here:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        scored = ray.data.from_items([{"path": path} for path in todo]).map_batches(
            _Scorer,
            fn_constructor_kwargs={"model": str(model), "threshold": threshold},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        bar = tqdm(total=len(todo), unit="img", desc="predict (ray)", disable=not progress)
        for batch in scored.iter_batches(batch_size=PART_ROWS, batch_format="numpy"):
            rows = [dict(zip(PREDICTION_FIELDS, values, strict=True))
                    for values in zip(*(batch[f].tolist() for f in PREDICTION_FIELDS),
                                      strict=True)]  # fmt: skip
            _write_part(parts, rows)
            bar.update(len(rows))
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
