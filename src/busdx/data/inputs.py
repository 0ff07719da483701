"""What ``busdx predict`` reads: image files under the given paths, a shard of them, the DICOM
frames to classify and each image's lesion box.

Everything here is lazy: folders are walked one listing at a time and inputs are yielded one
by one, so a folder of any size streams in constant memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from busdx.data.boxes import lookup_box, parse_box, read_boxes_csv
from busdx.data.dicom import count_frames, is_dicom_file
from busdx.data.imaging import Box, ImageInput, is_image_file
from busdx.errors import ConfigError, DataError, ImageDecodeError

__all__ = [
    "InputSelection",
    "expand_paths",
    "image_inputs",
    "iter_image_paths",
    "parse_frame",
    "parse_shard",
    "take_shard",
]


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
    each file's entry in a ``boxes`` table (:func:`busdx.data.boxes.read_boxes_csv`)."""
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


@dataclass(frozen=True)
class InputSelection:
    """Which images of the given paths to predict, and how: the command line's ``--shard``,
    ``--frame``, ``--box`` and ``--boxes`` as text, checked against the model by :meth:`inputs`.
    """

    shard: str | None = None
    frame: str = "0"
    box: str | None = None
    boxes: str | None = None

    def inputs(self, paths: Sequence[str | Path], *, roi_model: bool) -> Iterator[ImageInput]:
        """The inputs to predict, lazily. An ROI model needs boxes; a whole-image one takes
        none; ``box`` is one image's box. Raises :class:`ConfigError` when they do not fit."""
        if self.box and self.boxes:
            raise ConfigError("give --box (one image) or --boxes FILE (several), not both")
        given = bool(self.box or self.boxes)
        if roi_model and not given:
            raise ConfigError(
                "this model classifies a lesion box (ROI mode): give --box x,y,w,h "
                "for one image or --boxes FILE (path,x,y,w,h) for several"
            )
        if given and not roi_model:
            raise ConfigError(
                "this model was trained on whole images; it takes no --box or "
                "--boxes (train one with --set data.region=box)"
            )
        frame, shard = parse_frame(self.frame), parse_shard(self.shard)
        box = parse_box(self.box) if self.box else None
        boxes = read_boxes_csv(self.boxes) if self.boxes else None
        files = take_shard(iter_image_paths(paths), shard)
        return image_inputs(files, frame=frame, box=box, boxes=boxes)
