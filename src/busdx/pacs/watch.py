"""``busdx pacs``: score a PACS's new ultrasound instances and store the results back in it.

One pass finds the instances of a modality (QIDO-RS), skips those in the ledger, fetches the
others in chunks (WADO-RS), predicts them in batches, and stores each instance's Structured
Reports and Segmentations (STOW-RS, :mod:`busdx.pacs.dicom_out`), then writes it to the
ledger. ``watch`` repeats the pass every ``interval`` seconds.

Never twice: the ledger (one JSON line per instance: scored or failed, appended and flushed to
disk) survives restarts, and results have UIDs derived from their source and the model, so an
instance stored again after a crash between storing and recording replaces its results instead
of adding copies. Network errors are retried with bounded backoff (:class:`DicomWeb`); a pass
that still fails is reported and the next one tries again. An instance that cannot be read or
scored is recorded as failed, with the reason, and the pass goes on.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from busdx.data.inputs import InputSelection
from busdx.inference.batch import predict_files
from busdx.inference.predictor import Predictor
from busdx.pacs.dicom_out import ModelIdentity, dicom_results, model_identity
from busdx.pacs.dicomweb import DicomWeb, InstanceRef, NetworkError

__all__ = ["Ledger", "PassSummary", "score_new", "watch"]

logger = logging.getLogger(__name__)


class Ledger:
    """The instances already handled, by SOP Instance UID, kept in a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.done[entry["instance"]] = entry["status"]

    def __contains__(self, instance: str) -> bool:
        return instance in self.done

    def record(self, instance: str, status: str, **details: object) -> None:
        """Append one instance's outcome and flush it to disk before going on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"instance": instance, "status": status, "at": time.time(), **details})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[instance] = status


@dataclass(frozen=True)
class PassSummary:
    """What one pass did."""

    found: int  # instances of the modality on the server
    scored: int
    failed: int
    stored: int  # result objects stored
    seconds: float


def score_new(
    server: DicomWeb, loaded: Predictor, ledger: Ledger, *, modality: str = "US",
    frame: str = "0", chunk: int = 16,
) -> PassSummary:  # fmt: skip
    """One pass: every instance of ``modality`` not in ``ledger`` scored and its results stored.
    Raises :class:`NetworkError` when the server stays unreachable (the pass stops there)."""
    started, model = time.perf_counter(), model_identity(loaded)
    found = list(server.search_instances({"Modality": modality}))
    new = [ref for ref in found if ref.instance not in ledger]
    scored = failed = stored = 0
    for part in _chunks(new, chunk):
        with tempfile.TemporaryDirectory(prefix="busdx-pacs-") as folder:
            fetched = _fetch(server, part, Path(folder), ledger)
            results = _results(loaded, model, fetched, frame, ledger)
        done = {ref: objects for ref, objects in results.items() if objects is not None}
        failed += len(part) - len(done)
        if done:  # one request for the chunk; recorded once stored
            server.store([dataset for objects in done.values() for dataset in objects])
        for ref, objects in done.items():
            ledger.record(ref.instance, "scored", objects=len(objects))
            scored, stored = scored + 1, stored + len(objects)
    summary = PassSummary(len(found), scored, failed, stored, time.perf_counter() - started)
    logger.info("%s: %d %s instance(s), %d new: %d scored, %d failed, %d object(s) stored",
                server.url, summary.found, modality, len(new), scored, failed, stored)  # fmt: skip
    return summary


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fetch(server: DicomWeb, refs: list[InstanceRef], folder: Path, ledger: Ledger) -> dict:
    """Each instance written to ``folder``; an unreadable one is recorded as failed."""
    fetched = {}
    for ref in refs:
        try:
            dataset = server.retrieve(ref)
            path = folder / f"{ref.instance}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            fetched[ref] = (path, dataset)
        except NetworkError:
            raise
        except Exception as exc:  # a bad instance: reported, never the end of the pass
            _failed(ledger, ref, f"cannot be fetched or read: {type(exc).__name__}: {exc}")
    return fetched


def _results(loaded: Predictor, model: ModelIdentity, fetched: dict, frame: str,
             ledger: Ledger) -> dict:  # fmt: skip
    """Each fetched instance's result objects (None where it failed: recorded as such)."""
    by_path = {str(path): ref for ref, (path, _) in fetched.items()}
    inputs = list(InputSelection(frame=frame).inputs([p for p, _ in fetched.values()],
                                                     roi_model=False))  # fmt: skip
    objects: dict[InstanceRef, list | None] = {ref: [] for ref in fetched}
    for row in predict_files(loaded, inputs, total=len(inputs), progress=False):
        ref = by_path[row.path]
        if objects[ref] is None:
            continue
        if row.error is not None:
            _failed(ledger, ref, row.error)
            objects[ref] = None
            continue
        made = dicom_results(row, fetched[ref][1], model)
        objects[ref] += [dataset for _, dataset in made.files()]
    return objects


def _failed(ledger: Ledger, ref: InstanceRef, reason: str) -> None:
    logger.warning("instance %s: %s", ref.instance, reason)
    ledger.record(ref.instance, "failed", reason=reason)


def watch(
    server: DicomWeb, loaded: Predictor, ledger: Ledger, *, interval: float = 10.0,
    passes: int | None = None, sleep: Callable[[float], None] = time.sleep, **options: object,
) -> list[PassSummary]:  # fmt: skip
    """:func:`score_new` every ``interval`` seconds (``passes``: stop after that many; None:
    until interrupted). A pass the network broke is reported and retried at the next."""
    done: list[PassSummary] = []
    while passes is None or len(done) < passes:
        try:
            done.append(score_new(server, loaded, ledger, **options))
        except NetworkError as exc:
            logger.warning("pass failed, trying again in %.0f s: %s", interval, exc)
            done.append(PassSummary(0, 0, 0, 0, 0.0))
        if passes is None or len(done) < passes:
            sleep(interval)
    return done
