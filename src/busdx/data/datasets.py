"""Find labelled images on disk, split them reproducibly and serve them to PyTorch.

Three layouts are detected automatically:

* pre-split (the Kaggle layout): ``DIR/train/<class>``, ``DIR/validation/<class>`` (or ``val``),
  optionally ``DIR/test/<class>``;
* class folders (the BUSI layout): ``DIR/<class>``; the split is drawn here, seeded, by class;
* a table (:mod:`busdx.data.tables`): a labels CSV, or a dataset release that lists its images
  in one (BUS-BRA); its patient, site, box, BI-RADS and scanner columns travel with each sample, and
  a ``split`` column makes it pre-split.

Several folders can be combined, one per *site* (hospital, scanner), with :func:`scan_sites`:
every image is tagged with its site, splits are drawn within each site, and paths are written
relative to the folders' common parent so one split file covers all of them.

Files with ``_mask`` in their name are segmentation masks and are never read as images; other
folders (``masks/``) are ignored. Every image is decoded once while scanning, so a broken file is
reported by name and left out instead of crashing training later. The dataset is never modified.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from busdx.data.boxes import box_to_text, find_masks, sample_boxes
from busdx.data.imaging import Box, ImageInput, is_image_file, load_image
from busdx.data.tables import is_table_source, read_table
from busdx.errors import DataError, ImageDecodeError
from busdx.fileio import atomic_write_text, sha256_file

__all__ = [
    "SPLITS",
    "LabelledDataset",
    "Sample",
    "apply_split_file",
    "attach_boxes",
    "attach_masks",
    "draw_split",
    "merge_groups",
    "scan_dataset",
    "scan_sites",
    "write_split_csv",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
NORMAL_CLASS = "normal"


@dataclass(frozen=True)
class Sample:
    """One labelled image: where it is, what it is, which split it belongs to."""

    path: Path
    relpath: str  # POSIX path relative to the dataset root: the key used in split files
    label: int  # index into the class names; 1 is the positive class
    sha256: str
    class_folder: str  # the folder the image was found in ("normal" may be labelled benign)
    split: str | None = None
    group: int | None = None  # near-duplicate group: images of one group share a split
    site: str = ""  # where the image comes from: its data folder's name, or the name given
    box: Box | None = None  # lesion box (x, y, w, h), attached for ROI mode (attach_boxes)
    patient: str | None = None  # images of one patient (or lesion) share every split and fold
    birads: str | None = None  # the readers' BI-RADS category, where the table gives it
    scanner: str = ""  # the device, where the table gives it: reported as a sub-site
    masks: tuple[Path, ...] = ()  # lesion mask files, attached for a mask head (attach_masks)

    @property
    def input(self) -> ImageInput:
        """The sample as an :class:`~busdx.data.imaging.ImageInput` (with its box)."""
        return ImageInput(self.path, box=self.box)


@dataclass
class LabelledDataset:
    """The images found under ``root`` and how they were found."""

    root: Path
    layout: str  # "pre-split", "class-folders" or "table"
    class_names: list[str]
    samples: list[Sample]
    skipped: list[str]  # "path: reason" for files that could not be decoded
    sites: dict[str, Path] = field(default_factory=dict)  # site name -> its data folder
    split: str | None = None  # the split the samples were taken from ("all": every image)

    @property
    def site(self) -> str:
        """The site's name, or the sites' names joined by ``+``."""
        return "+".join(self.sites) or self.root.name

    def subset(self, split: str) -> list[Sample]:
        """Samples of one split ("train", "val", "test")."""
        return [s for s in self.samples if s.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for summaries."""
        table: dict[str, dict[str, int]] = {}
        for sample in self.samples:
            row = table.setdefault(sample.split or "unsplit", dict.fromkeys(self.class_names, 0))
            row[self.class_names[sample.label]] += 1
        return table


def _child_dirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}


def _detect_layout(root: Path, folder_names: list[str]) -> str:
    children = _child_dirs(root)
    if "train" in children:
        return "pre-split"
    if any(name in children for name in folder_names):
        return "class-folders"
    raise DataError(
        f"{root} holds neither train/ + validation/ folders nor class folders "
        f"({'/, '.join(folder_names)}/); put the images in one subfolder per class"
    )


def _scan_class_folders(
    folder: Path, root: Path, class_folders: dict[str, int], split: str | None, site: str
) -> tuple[list[Sample], list[str]]:
    samples, skipped = [], []
    children = _child_dirs(folder)
    for name, label in class_folders.items():
        class_dir = children.get(name)
        if class_dir is None:
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p))
        for path in files:
            try:
                load_image(path)
            except ImageDecodeError as exc:
                skipped.append(str(exc))
                logger.warning("skipping %s", exc)
                continue
            relpath = path.relative_to(root).as_posix()
            samples.append(
                Sample(path, relpath, label, sha256_file(path), class_dir.name, split, site=site)
            )
    return samples, skipped


def scan_dataset(
    root: str | Path,
    class_names: Sequence[str],
    *,
    include_normal: bool = False,
    site: str | None = None,
) -> LabelledDataset:
    """Find and check every image under ``root``.

    ``class_names`` lists the negative class first and the positive class second. With
    ``include_normal``, images in ``normal/`` folders are labelled as the negative class.
    ``site`` names where the images come from (default: the folder's name).
    Raises :class:`DataError` when the folder is missing, empty or lacks a class.
    """
    root = Path(root).expanduser().resolve()
    class_names = list(class_names)
    class_folders = {name.lower(): i for i, name in enumerate(class_names)}
    if include_normal:
        class_folders[NORMAL_CLASS] = 0
    if is_table_source(root):
        return _scan_table(root, class_names, class_folders, site)
    site = site or root.name
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    layout = _detect_layout(root, list(class_folders))
    samples: list[Sample] = []
    skipped: list[str] = []
    if layout == "pre-split":
        for folder_name, path in _child_dirs(root).items():
            split = _SPLIT_FOLDERS.get(folder_name)
            if split is not None:
                found, bad = _scan_class_folders(path, root, class_folders, split, site)
                samples += found
                skipped += bad
        if not any(s.split == "val" for s in samples):
            raise DataError(f"{root} has a train/ folder but no images in validation/ (or val/)")
    else:
        samples, skipped = _scan_class_folders(root, root, class_folders, None, site)
    dataset = LabelledDataset(root, layout, class_names, samples, skipped, {site: root})
    _check_classes(dataset)
    return dataset


def _scan_table(
    source: Path, class_names: list[str], class_folders: dict[str, int], site: str | None
) -> LabelledDataset:
    """The images a labels table lists (see :mod:`busdx.data.tables`), checked as they are found."""
    root, rows = read_table(source)
    default_site = site or (source.name if source.is_dir() else root.name)
    unknown = sorted({r.label for r in rows} - set(class_folders) - {NORMAL_CLASS})
    if unknown:
        raise DataError(
            f"{source} has label(s) {', '.join(map(repr, unknown))}; expected "
            f"{', '.join(class_folders)}"
        )
    splits = {row.split for row in rows}
    if None in splits and len(splits) > 1:
        raise DataError(f"{source}: some rows have a split and some do not; fill the split column")
    samples, skipped = [], []
    for row in rows:
        if row.label not in class_folders:  # normal images, unless include_normal
            continue
        try:
            load_image(row.path)
        except ImageDecodeError as exc:
            skipped.append(str(exc))
            logger.warning("skipping %s", exc)
            continue
        split = None if row.split is None else _SPLIT_FOLDERS.get(row.split)
        if row.split is not None and split is None:
            raise DataError(f"{source}: unknown split {row.split!r} for {row.path.name}")
        samples.append(Sample(
            row.path, row.path.relative_to(root).as_posix(), class_folders[row.label],
            sha256_file(row.path), row.label, split, site=row.site or default_site, box=row.box,
            patient=row.patient, birads=row.birads, scanner=row.scanner,
        ))  # fmt: skip
    layout = "table" if None in splits else "pre-split"
    sites = dict.fromkeys(sorted({s.site for s in samples}), root)
    dataset = LabelledDataset(root, layout, class_names, samples, skipped, sites)
    _check_classes(dataset)
    return dataset


def merge_groups(samples: Sequence[Sample], groups: Sequence[int] | None) -> list[int] | None:
    """``groups`` (near-duplicate groups, one id per sample) joined with the patients: images of
    one patient at one site end up in one group. None when there is neither."""
    if groups is None and all(s.patient is None for s in samples):
        return None
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, object], int] = {}
    for index, sample in enumerate(samples):
        keys = [("group", groups[index])] if groups is not None else []
        keys += [(f"patient:{sample.site}", sample.patient)] if sample.patient else []
        for key in keys:
            parent[find(index)] = find(first.setdefault(key, index))
    roots = [find(i) for i in range(len(samples))]
    renumber = {root: number for number, root in enumerate(dict.fromkeys(roots))}
    return [renumber[root] for root in roots]


def attach_boxes(dataset: LabelledDataset, boxes_file: str | None = None) -> LabelledDataset:
    """The dataset with each sample's lesion box (ROI mode), from ``boxes_file`` or from the
    lesion masks found beside the images (see :func:`busdx.data.boxes.sample_boxes`). Boxes that a
    labels table gave are kept when no ``boxes_file`` is named."""
    if boxes_file is None and all(s.box is not None for s in dataset.samples):
        return dataset
    boxes = sample_boxes(
        [s.path for s in dataset.samples],
        [s.relpath for s in dataset.samples],
        [dataset.sites.get(s.site, dataset.root) for s in dataset.samples],
        boxes_file,
    )
    samples = [replace(s, box=box) for s, box in zip(dataset.samples, boxes, strict=True)]
    return replace(dataset, samples=samples)


def attach_masks(dataset: LabelledDataset, *, required: bool = True) -> LabelledDataset:
    """Each sample's lesion masks (``find_masks``; ``()``: none); training ``required`` some."""
    root = dataset.root
    samples = [replace(s, masks=tuple(find_masks(s.path, dataset.sites.get(s.site, root))))
               for s in dataset.samples]  # fmt: skip
    if required and not any(s.masks for s in samples):
        raise DataError("no lesion mask found (<image>_mask.png, masks/<image>_tumor.png, "
                        "Masks/mask_<id>.png); model.mask_head needs some")  # fmt: skip
    logger.info("lesion masks: %d of %d images", sum(bool(s.masks) for s in samples), len(samples))
    return replace(dataset, samples=samples)


def parse_source(source: str | Path) -> tuple[str | None, Path]:
    """``DIR`` or ``NAME=DIR`` (a site name for the folder) -> (name or None, folder)."""
    text = str(source)
    name, sep, folder = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return name, Path(folder)
    return None, Path(text)


def scan_sites(
    sources: Sequence[str | Path], class_names: Sequence[str], *, include_normal: bool = False
) -> LabelledDataset:
    """Find the images of one or more data folders, each one site.

    A source is ``DIR`` (the site is named after the folder) or ``NAME=DIR``. With several
    sites, every site must have the same layout, and sample paths are relative to the folders'
    common parent (``busi/benign/x.png``) so that one split file covers them all.
    """
    if not sources:
        raise DataError("no data folder given; pass --data DIR (repeat it for several sites)")
    parts = [
        scan_dataset(folder, class_names, include_normal=include_normal, site=name)
        for name, folder in map(parse_source, sources)
    ]
    if len(parts) == 1:
        return parts[0]
    names = [name for part in parts for name in part.sites]
    roots = sorted({part.root for part in parts})
    if len(set(names)) < len(names):
        raise DataError(
            f"two data folders share the site name {Counter(names).most_common(1)[0][0]!r}; "
            "name them: --data NAME=DIR"
        )
    common = Path(os.path.commonpath(roots))
    if len(roots) < len(parts) or common in roots:
        raise DataError(
            f"data folders must be distinct and not inside one another; {common} is given "
            "twice or holds another"
        )
    layouts = {part.layout for part in parts}
    if "pre-split" in layouts and len(layouts) > 1:
        raise DataError(
            "the data sources mix given splits (pre-split folders or a split column) with "
            "unsplit ones; give all of them a split, or none"
        )
    samples = [
        replace(sample, relpath=sample.path.relative_to(common).as_posix())
        for part in parts
        for sample in part.samples
    ]
    return LabelledDataset(
        common,
        layouts.pop() if len(layouts) == 1 else "+".join(sorted(layouts)),
        list(class_names),
        sorted(samples, key=lambda s: s.relpath),
        [line for part in parts for line in part.skipped],
        {name: root for part in parts for name, root in part.sites.items()},
    )


def _check_classes(dataset: LabelledDataset) -> None:
    found = Counter(s.label for s in dataset.samples)
    if not dataset.samples:
        raise DataError(f"no readable images (.png/.jpg/.jpeg/.bmp/.tif) found in {dataset.root}")
    missing = [name for i, name in enumerate(dataset.class_names) if found[i] == 0]
    if missing:
        raise DataError(
            f"no images for class {', '.join(missing)} in {dataset.root}; both "
            f"{' and '.join(dataset.class_names)} images are needed (one folder per class)"
        )


def draw_split(
    samples: Sequence[Sample],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Sequence[int] | None = None,
) -> list[Sample]:
    """Assign train/val/test stratified by class, reproducibly for a given ``seed``.

    ``groups`` (one id per sample, e.g. near-duplicate groups from the audit) keeps every group
    in a single split; a group counts for the class most of its images have. Within each class
    the groups are shuffled with a seeded generator and dealt to test, then val, until each holds
    its fraction of the class's images (at least one group each), the rest to train. Samples of
    several sites are split site by site.
    """
    groups = list(range(len(samples))) if groups is None else list(groups)
    sites = sorted({s.site for s in samples})
    if len(sites) > 1:  # each site split on its own, so that every split holds each site
        drawn = [
            draw_split(
                [s for s in samples if s.site == site],
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=seed,
                groups=[g for s, g in zip(samples, groups, strict=True) if s.site == site],
            )
            for site in sites
        ]
        return sorted((s for part in drawn for s in part), key=lambda s: s.relpath)
    members: dict[int, list[Sample]] = {}
    for sample, group in sorted(zip(samples, groups, strict=True), key=lambda p: p[0].relpath):
        members.setdefault(group, []).append(replace(sample, group=group))
    by_label: dict[int, list[list[Sample]]] = {}
    for group_samples in members.values():
        labels = Counter(s.label for s in group_samples)
        majority = max(labels, key=lambda label: (labels[label], label))
        by_label.setdefault(majority, []).append(group_samples)
    result = [
        sample
        for label, units in sorted(by_label.items())
        for sample in _deal(units, label, val_fraction, test_fraction, seed)
    ]
    return sorted(result, key=lambda s: s.relpath)


def _deal(
    units: list[list[Sample]], label: int, val_fraction: float, test_fraction: float, seed: int
) -> list[Sample]:
    """One class's groups (``units``), shuffled and dealt to test, then val, until each holds
    its fraction (at least one group each); the rest go to train."""
    wanted = [f for f in (test_fraction, val_fraction) if f > 0]
    if len(units) < len(wanted) + 1:
        raise DataError(
            f"class {label} has only {len(units)} independent image group(s): too few for a "
            "train/val/test split; add images or set data.val_fraction and "
            "data.test_fraction to 0"
        )
    total = sum(len(unit) for unit in units)
    quota = {"test": test_fraction * total, "val": val_fraction * total}
    filled = {"test": 0, "val": 0, "train": 0}
    dealt: list[Sample] = []
    order = np.random.default_rng([seed, label]).permutation(len(units))
    for position, index in enumerate(order):
        unit = units[index]
        last_chance_for_train = position == len(order) - 1 and filled["train"] == 0
        split = next(
            (
                name
                for name in ("test", "val")
                if quota[name] > 0
                and not last_chance_for_train
                and (filled[name] == 0 or filled[name] + len(unit) / 2 <= quota[name])
            ),
            "train",
        )
        filled[split] += len(unit)
        dealt += [replace(s, split=split) for s in unit]
    return dealt


def write_split_csv(dataset: LabelledDataset, path: str | Path) -> None:
    """Save ``path,label,split,group,sha256,site`` rows, one per image, for audit and re-use
    (and a ``box`` column, ``x,y,w,h``, when the samples carry lesion boxes: ROI mode)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    boxed = any(s.box is not None for s in dataset.samples)
    writer.writerow(["path", "label", "split", "group", "sha256", "site"] + ["box"] * boxed)
    for s in dataset.samples:
        group = "" if s.group is None else s.group
        label = dataset.class_names[s.label]
        box = [box_to_text(s.box) or ""] if boxed else []
        writer.writerow([s.relpath, label, s.split or "", group, s.sha256, s.site, *box])
    atomic_write_text(path, buffer.getvalue())


def apply_split_file(dataset: LabelledDataset, path: str | Path) -> LabelledDataset:
    """Return ``dataset`` restricted to, and split as, the rows of a split CSV.

    The file needs ``path``, ``label`` and ``split`` columns (``split.csv`` of any run works);
    ``validation`` is read as ``val``. Images missing on disk or labelled differently are errors;
    images on disk that the file does not list are left out, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing_columns = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing_columns:
            raise DataError(
                f"split file {path} lacks column(s) {', '.join(sorted(missing_columns))}"
            )
        rows = list(reader)
    by_path = {s.relpath: s for s in dataset.samples}
    chosen, absent = [], []
    for row in rows:
        split = _SPLIT_FOLDERS.get(row["split"].strip().lower())
        if split is None:
            raise DataError(f"split file {path}: unknown split {row['split']!r} for {row['path']}")
        sample = by_path.get(row["path"])
        if sample is None:
            absent.append(row["path"])
            continue
        if dataset.class_names[sample.label] != row["label"]:
            raise DataError(
                f"split file {path}: {row['path']} is labelled {row['label']!r} there but "
                f"{dataset.class_names[sample.label]!r} on disk"
            )
        chosen.append(replace(sample, split=split))
    if absent:
        raise DataError(
            f"split file {path} lists {len(absent)} image(s) not found (or unreadable) under "
            f"{dataset.root}, e.g. {absent[0]!r}; is --data the dataset the split was made for?"
        )
    left_out = len(dataset.samples) - len(chosen)
    if left_out:
        logger.warning("%d image(s) on disk are not in %s and are left out", left_out, path)
    return replace(dataset, samples=sorted(chosen, key=lambda s: s.relpath))
