"""Run directories: create them, record their config and split, and read them back."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from busdx import __version__
from busdx.config import Config, apply_overrides, config_from_dict
from busdx.data.audit import audit_dataset
from busdx.data.datasets import (
    LabelledDataset,
    apply_split_file,
    attach_boxes,
    attach_masks,
    draw_split,
    merge_groups,
    scan_sites,
    write_split_csv,
)
from busdx.errors import CheckpointError, ConfigError, DataError, RunDirError
from busdx.fileio import atomic_write_text, write_json
from busdx.layout import CONFIG_FILE, INFO_FILE, SPLIT_FILE
from busdx.provenance import environment

__all__ = [
    "create_run_dir",
    "load_run",
    "prepare_dataset",
    "resumed_config",
    "run_sources",
    "samples_for_split",
    "save_config",
    "save_run",
]

logger = logging.getLogger(__name__)


def create_run_dir(out: str | Path | None, recipe: str) -> Path:
    """A new, empty run directory (default ``runs/<recipe>-<timestamp>``)."""
    run_dir = Path(out) if out else Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(
            f"{run_dir} already exists and is not empty; choose another --out, or continue "
            f"that run with --resume {run_dir}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_dataset(
    config: Config, sources: str | Path | Sequence[str | Path], *, progress: bool = False
) -> LabelledDataset:
    """Scan the data (one folder, or one per site) and assign splits: from a split file, the
    folders, or a seeded draw (within each site).

    With ``data.group_duplicates`` (default) a drawn split keeps near-duplicate groups whole, and
    a given split (folders or split file) is checked for duplicates across splits: a warning. The
    images of one patient (a table's patient column) are always kept together.
    """
    dataset = _scan(config, sources, training=True)
    if config.data.split_file:
        dataset = apply_split_file(dataset, config.data.split_file)
    groups = None
    if config.data.group_duplicates:
        audit = audit_dataset(
            dataset, max_distance=config.data.duplicate_distance, progress=progress
        )
        groups = audit.groups
        if (dataset.layout == "pre-split" or config.data.split_file) and audit.cross_split_pairs:
            logger.warning(
                "LEAKAGE: %d duplicate or near-duplicate image pair(s) straddle two splits; "
                "validation/test metrics will be optimistic. See: busdx audit --data %s",
                len(audit.cross_split_pairs),
                dataset.root,
            )
    groups = merge_groups(dataset.samples, groups)  # a patient's images form one group too
    if groups is not None:
        dataset.samples = [
            replace(s, group=g) for s, g in zip(dataset.samples, groups, strict=True)
        ]
    if dataset.layout == "pre-split" or config.data.split_file:
        return dataset
    dataset.samples = draw_split(
        dataset.samples,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.train.seed,
        groups=groups,
    )
    return dataset


def _scan(
    config: Config, sources: str | Path | Sequence[str | Path], *, training: bool = False
) -> LabelledDataset:
    """The images of ``sources`` with what the model needs beside them: lesion masks for a
    mask head (required for training, optional for an evaluation), boxes for an ROI model."""
    sources = [sources] if isinstance(sources, str | Path) else list(sources)
    dataset = scan_sites(sources, config.data.classes, include_normal=config.data.include_normal)
    if config.model.mask_head:
        dataset = attach_masks(dataset, required=training)
    if config.data.region == "box":
        return attach_boxes(dataset, config.data.boxes)
    # a table's boxes are for ROI models only: a whole-image model takes none
    return replace(dataset, samples=[replace(s, box=None) for s in dataset.samples])


def run_sources(info: dict[str, Any]) -> list[str]:
    """The data folders a run was made from, as ``NAME=DIR`` sources (see ``scan_sites``)."""
    sites = info.get("sites") or {}
    if not sites:  # runs made before sites were recorded
        return [info["data_root"]]
    return [f"{name}={root}" for name, root in sites.items()]


def save_config(run_dir: Path, config: Config) -> None:
    """Write the resolved config as ``config.yaml``."""
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))


def save_run(run_dir: Path, config: Config, dataset: LabelledDataset) -> None:
    """Write the resolved config, the split and where the data came from."""
    save_config(run_dir, config)
    write_split_csv(dataset, run_dir / SPLIT_FILE)
    info = {
        "data_root": str(dataset.root),
        "sites": {name: str(root) for name, root in dataset.sites.items()},
        "layout": dataset.layout,
        "counts": dataset.counts(),
        "skipped_files": dataset.skipped,
        "busdx_version": __version__,
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["busdx", *sys.argv[1:]]),
    }
    write_json(run_dir / INFO_FILE, info)


# Settings a resumed training may change: how long it runs and where, not what it trains.
RESUMABLE_SETTINGS = frozenset(
    {
        "train.epochs",
        "train.early_stopping_patience",
        "train.device",
        "train.threads",
        "data.num_workers",
        "data.memory_cache_mb",
    }
)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumed_config(run_dir: Path, saved: Config, overrides: list[str]) -> Config:
    """The saved config of a run with ``overrides`` applied, if a resume can honour them.

    A resume restores the weights, the optimizer (its learning rate included) and the schedule
    from ``last.pt``; an override of anything else would be written to ``config.yaml`` and then
    ignored, or would not fit the saved weights. Only :data:`RESUMABLE_SETTINGS` may change,
    and ``train.epochs`` not under a cosine schedule, which was planned for the original count.
    """
    config = apply_overrides(saved, overrides)
    before, after = _flatten(saved.to_dict()), _flatten(config.to_dict())
    changed = sorted(key for key in after if after[key] != before.get(key))
    refused = [key for key in changed if key not in RESUMABLE_SETTINGS]
    if "train.epochs" in changed and saved.train.schedule == "cosine":
        refused.append("train.epochs")
    if refused:
        what = ", ".join(f"{key} ({before.get(key)!r} -> {after[key]!r})" for key in refused)
        raise ConfigError(
            f"--resume {run_dir} continues the run with its saved weights, optimizer and "
            f"schedule, so it cannot change {what}; start a new run with --out instead"
        )
    return config


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, Any]]:
    """The config and run info of an existing run directory."""
    run_dir = Path(run_dir)
    config_path, info_path = run_dir / CONFIG_FILE, run_dir / INFO_FILE
    if not config_path.is_file() or not info_path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a busdx run directory (no {CONFIG_FILE}/{INFO_FILE})"
        )
    config = config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")))
    return config, json.loads(info_path.read_text(encoding="utf-8"))


def _holds_the_run_images(dataset: LabelledDataset, split_file: Path, info: dict[str, Any]) -> bool:
    """Whether ``dataset`` is the data the run was split on: every image of its ``split.csv`` is
    there, at the same relative path with the same sha256, wherever the folder now lives (a
    moved or copied dataset is still the run's own). Split files without checksums fall back to
    comparing the folder paths. A run without ``split.csv`` (a bundled model) has no own data."""
    if not split_file.is_file():
        return False
    with split_file.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not rows[0].get("sha256"):
        own = {str(path) for path in dataset.sites.values()}
        return own == set((info.get("sites") or {"": info["data_root"]}).values())
    on_disk = {sample.relpath: sample.sha256 for sample in dataset.samples}
    return all(on_disk.get(row["path"]) == row["sha256"] for row in rows)


def samples_for_split(
    run_dir: Path,
    config: Config,
    info: dict[str, Any],
    data: str | Path | Sequence[str | Path] | None,
    split: str | None,
) -> LabelledDataset:
    """The dataset to evaluate (``data``: one folder or several sites; default the run's own),
    split as the run split it when it is the run's own data.

    For other data: a pre-split dataset keeps its folders; a class-folder dataset has no split,
    so it must be evaluated whole with ``split='all'``. ``split=None`` picks for the user: the
    test split of the run's own data, every image of data the run never saw. The returned
    dataset's ``split`` says which.
    """
    if data is None and not (run_dir / SPLIT_FILE).is_file():
        raise DataError(
            f"{run_dir.name} carries no data of its own (a bundled model): give the labelled "
            "cases to use with --data DIR"
        )
    dataset = _scan(config, data or run_sources(info))
    root = dataset.root
    own = _holds_the_run_images(dataset, run_dir / SPLIT_FILE, info)
    if own:
        dataset = apply_split_file(dataset, run_dir / SPLIT_FILE)
    split = split or ("test" if own else "all")
    if split == "all":
        return replace(dataset, split=split)
    chosen = dataset.subset(split)
    if not chosen:
        available = sorted({s.split for s in dataset.samples if s.split})
        raise DataError(
            f"no {split!r} images in {root} (splits found: {', '.join(available) or 'none'}); "
            "evaluate another split, or --split all for a dataset the run never saw"
        )
    return replace(dataset, samples=chosen, split=split)
