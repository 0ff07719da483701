"""Options shared by several commands, defined once."""

from __future__ import annotations

import argparse

from busdx.config import list_recipes
from busdx.hardware import PRECISIONS

__all__ = ["Subcommands", "add_common", "add_config_options", "add_precision", "overrides"]

Subcommands = argparse._SubParsersAction  # what each command module's register() receives

# flag name -> config key: shortcuts of --set for the settings changed most often
SHORTCUTS = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "train.seed",
    "device": "train.device",
    "weights": "model.weights",
    "split_file": "data.split_file",
    "image_size": "data.image_size",
}


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` and ``--any-modality``: every command that reads images."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--any-modality", action="store_true",
        help="read DICOM files of any modality (default: ultrasound, US, only)",
    )  # fmt: skip


def add_precision(parser: argparse.ArgumentParser) -> None:
    """``--precision``: autocast of the torch backend."""
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="torch backend: bf16 (GPU, or a CPU with avx512_bf16 / AMX) or fp16 (GPU) autocast",
    )  # fmt: skip


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Recipe, config file and overrides: the same flags for every command that trains."""
    parser.add_argument("--config", help="YAML config file (values over the recipe's)")
    parser.add_argument("--recipe", help=f"built-in recipe: {', '.join(list_recipes())}")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--weights", help="imagenet | none | PATH to a backbone state_dict")
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--split-file", help="re-use a split CSV (path,label,split columns)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override any config value, e.g. --set augment.zoom=0.1",
    )  # fmt: skip


def overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides given: the shortcut flags as ``key=value``, then every ``--set``."""
    items = [
        f"{key}={getattr(args, name)}"
        for name, key in SHORTCUTS.items()
        if getattr(args, name, None) is not None
    ]
    return items + list(args.set or [])
