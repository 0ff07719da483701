"""Lesion boxes: parse them, read them from masks or a CSV, check them, crop an image to them.

A box is ``(x, y, width, height)`` in pixels of the file as stored (for a DICOM, of its full
frame: see :data:`busdx.data.imaging.ORIGIN_KEY`), the convention of the CLI's ``--box x,y,w,h``,
of the API's ``box`` field and of the web page. A model trained in ROI mode
(``data.region: box``) looks at the box enlarged by a margin on every side
(``data.box_margin``, a fraction of the box's width and height), so the lesion's border and
the tissue around it are in view.

For training, boxes come from the datasets' lesion masks: ``<image>_mask*.png`` beside each
image (the original BUSI layout; an image with several masks gets the box around all of
them), ``masks/<class>/<image>_mask*.png`` under the dataset root (this project's BUSI copy,
masks at the original resolution: boxes are scaled to the image), BrEaST's
``masks/<image>_tumor.png``, or a CSV given as ``data.boxes``.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from busdx.data.imaging import ORIGIN_KEY, Box, load_image
from busdx.errors import BoxError, DataError

__all__ = [
    "box_to_text",
    "check_box",
    "crop_rectangle",
    "crop_to_box",
    "find_masks",
    "lookup_box",
    "mask_box",
    "parse_box",
    "read_boxes_csv",
    "read_mask",
    "sample_boxes",
]


def parse_box(text: str) -> Box:
    """``"x,y,w,h"`` (integers, pixels) as a box; :class:`BoxError` says what is wrong."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        x, y, width, height = (round(float(part)) for part in parts)
    except ValueError:
        raise BoxError(f"a box is x,y,w,h in pixels (four numbers), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise BoxError(f"box {text!r} has zero area: its width and height must be positive")
    if x < 0 or y < 0:
        raise BoxError(f"box {text!r} starts outside the image: x and y must be >= 0")
    return x, y, width, height


def box_to_text(box: Box | None) -> str | None:
    """A box as ``"x,y,w,h"`` (None stays None), the form :func:`parse_box` reads."""
    return None if box is None else ",".join(str(v) for v in box)


def check_box(box: Box, image: Image.Image, name: str = "image") -> tuple[int, int, int, int]:
    """The box as (left, top, right, bottom) in ``image``'s pixels, or :class:`BoxError` when
    it does not lie inside the image (a DICOM's boxes are shifted by its region's origin)."""
    x, y, width, height = box
    if width <= 0 or height <= 0:
        raise BoxError(f"{name}: box {box_to_text(box)} has zero area")
    origin_x, origin_y = image.info.get(ORIGIN_KEY, (0, 0))
    left, top = x - origin_x, y - origin_y
    right, bottom = left + width, top + height
    if left < 0 or top < 0 or right > image.width or bottom > image.height:
        full = (image.width + origin_x, image.height + origin_y)
        raise BoxError(
            f"{name}: box {box_to_text(box)} lies outside the image "
            f"({full[0]}x{full[1]}"
            + (f", B-mode region from x={origin_x}, y={origin_y})" if origin_x or origin_y else ")")
        )
    return left, top, right, bottom


def crop_rectangle(
    image: Image.Image, box: Box, *, margin: float, jitter: float = 0.0, name: str = "image"
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in ``image`` of the box enlarged by ``margin`` (a fraction of
    its width / height on each side), clipped to the image. With ``jitter``, each edge moves by
    up to that fraction of the box's side, drawn from torch's random stream (seeded per image
    by the training loader)."""
    left, top, right, bottom = check_box(box, image, name)
    width, height = right - left, bottom - top
    edges = np.array([left - margin * width, top - margin * height,
                      right + margin * width, bottom + margin * height])  # fmt: skip
    if jitter:  # training only: inference never imports torch
        import torch

        shift = (torch.rand(4).numpy() * 2 - 1) * jitter
        edges += shift * np.array([width, height, width, height])
    left_, top_ = max(0, round(edges[0])), max(0, round(edges[1]))
    right_ = min(image.width, max(left_ + 1, round(edges[2])))
    bottom_ = min(image.height, max(top_ + 1, round(edges[3])))
    return left_, top_, right_, bottom_


def crop_to_box(
    image: Image.Image, box: Box, *, margin: float, jitter: float = 0.0, name: str = "image"
) -> Image.Image:
    """``image`` cropped to :func:`crop_rectangle`."""
    return image.crop(crop_rectangle(image, box, margin=margin, jitter=jitter, name=name))


def find_masks(image_path: Path, root: Path) -> list[Path]:
    """Lesion mask files of an image: ``<stem>_mask*.png`` beside it (BUSI), or
    ``<stem>_tumor.png`` / ``<stem>_mask*.png`` / ``<stem>.png`` in a ``masks/`` folder of its
    folder, of its parent, of the dataset ``root`` (BrEaST), or in ``root/masks/`` under the
    image's own relative folder (``masks/benign/`` for ``benign/x.png``), or the BUS-BRA
    release's ``Masks/mask_<id>.png`` for ``Images/bus_<id>.png``."""
    stem = glob.escape(image_path.stem)
    found = sorted(image_path.parent.glob(f"{stem}_mask*.png"))
    if image_path.stem.startswith("bus_"):
        bus_bra = image_path.parent.parent / "Masks" / f"mask_{image_path.stem[4:]}.png"
        found += [bus_bra] if bus_bra.is_file() else []
    mirrored = root / "masks" / image_path.parent.relative_to(root)
    for masks in dict.fromkeys(
        (image_path.parent / "masks", image_path.parent.parent / "masks", root / "masks", mirrored)
    ):
        if masks.is_dir():
            for pattern in (f"{stem}_tumor.png", f"{stem}_mask*.png", f"{stem}.png"):
                found += sorted(masks.glob(pattern))
    return list(dict.fromkeys(found))


def read_mask(masks: Sequence[Path], image_size: tuple[int, int]) -> Image.Image:
    """The union of mask files as one 8-bit mask (255: lesion) of ``image_size`` (width,
    height): a mask of another size is resized to it (nearest neighbour)."""
    union = np.zeros(image_size[::-1], dtype=bool)
    for path in masks:
        with Image.open(path) as mask:
            level = _mask_level(mask)
            if level.size != image_size:
                level = level.resize(image_size, Image.Resampling.NEAREST)
            union |= np.asarray(level) > 127
    return Image.fromarray(union.astype(np.uint8) * 255)


def _mask_level(mask: Image.Image) -> Image.Image:
    """A mask file as 8-bit levels: a colour mask by its brightest channel (BUS-UCLM draws
    benign lesions green and malignant ones red; pure red is 76 in luminance), any other by
    its grey level."""
    if mask.mode in {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "HSV"}:
        return Image.fromarray(np.asarray(mask.convert("RGB")).max(axis=2))
    return mask.convert("L")


def mask_box(masks: Sequence[Path], image_size: tuple[int, int] | None = None) -> Box | None:
    """The box around every non-zero pixel of the masks (None when all are empty), scaled to
    ``image_size`` (width, height) when the masks have another size."""
    edges = []
    for path in masks:
        with Image.open(path) as mask:
            pixels = np.asarray(mask.convert("L"))
        ys, xs = np.nonzero(pixels)
        if len(xs):
            scale = np.ones(2) if image_size is None else np.divide(image_size, pixels.shape[::-1])
            edges.append(
                np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * np.tile(scale, 2)
            )
    if not edges:
        return None
    left, top = np.min(edges, axis=0)[:2]
    right, bottom = np.max(edges, axis=0)[2:]
    x, y = int(np.floor(left)), int(np.floor(top))
    return x, y, max(1, int(np.ceil(right)) - x), max(1, int(np.ceil(bottom)) - y)


def read_boxes_csv(path: str | Path) -> dict[str, Box]:
    """Boxes by image from a CSV with a ``path`` (or ``image`` / ``relative_path``) column and
    either a ``box`` column (``"x,y,w,h"``) or ``x``, ``y``, ``w``, ``h`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"boxes file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        key = next((name for name in ("path", "relative_path", "image") if name in fields), None)
        has_box = "box" in fields or {"x", "y", "w", "h"} <= fields
        if key is None or not has_box:
            raise DataError(
                f"{path} needs a path (or image / relative_path) column and a box column "
                f"(x,y,w,h) or x, y, w and h columns"
            )
        boxes = {}
        for number, row in enumerate(reader, start=2):
            text = row["box"] if "box" in fields else ",".join(row[k] for k in "xywh")
            try:
                boxes[row[key].strip()] = parse_box(text)
            except BoxError as exc:
                raise DataError(f"{path}, line {number}: {exc}") from None
    return boxes


def lookup_box(boxes: dict[str, Box], path: Path, relpath: str | None = None) -> Box | None:
    """The box of an image in a :func:`read_boxes_csv` table, by the path as given, its
    relative path or its file name."""
    for key in (str(path), relpath, path.as_posix(), path.name):
        if key is not None and key in boxes:
            return boxes[key]
    return None


def _box_from_masks(path: Path, root: Path) -> Box | None:
    masks = find_masks(path, root)
    if not masks:
        return None
    return mask_box(masks, load_image(path).size)


def sample_boxes(
    paths: Sequence[Path],
    relpaths: Sequence[str],
    roots: Sequence[Path],
    boxes_file: str | None = None,
) -> list[Box]:
    """The lesion box of each image, from ``boxes_file`` when given, else from its masks
    (searched for under the image's dataset ``root`` too); :class:`DataError` naming the
    images that have none."""
    table = read_boxes_csv(boxes_file) if boxes_file else None
    found, missing = [], []
    for path, relpath, root in zip(paths, relpaths, roots, strict=True):
        box = lookup_box(table, path, relpath) if table else _box_from_masks(path, root)
        if box is None:
            missing.append(relpath)
        found.append(box)
    if missing:
        source = boxes_file or "a lesion mask (<image>_mask.png, masks/<image>_tumor.png)"
        raise DataError(
            f"{len(missing)} image(s) have no lesion box in {source}, e.g. {missing[0]}; "
            f"ROI mode (data.region: box) needs one for every image"
        )
    return found
