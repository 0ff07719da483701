"""The ``busdx`` parser, assembled from the command modules, and the entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from busdx import __version__
from busdx.cli import (
    adapt,
    audit,
    calibrate,
    compare,
    cv,
    demo,
    evaluate,
    export,
    models,
    pacs,
    predict,
    report,
    serve,
    train,
)
from busdx.data.dicom import ANY_MODALITY_ENV
from busdx.errors import BusdxError

__all__ = ["build_parser", "main"]

COMMANDS = (train, evaluate, calibrate, adapt, compare, predict, serve, export, cv, report,
            models, audit, demo, pacs)  # fmt: skip

# what `pip install busdx` leaves out, and the extra that brings it (pyproject.toml)
EXTRA_OF = {"torch": "train", "torchvision": "train", "onnx": "train", "sklearn": "train",
            "highdicom": "pacs"}  # fmt: skip

EXAMPLES = """examples:
  busdx predict scan.png                       (the bundled model: no training needed)
  busdx models
  busdx demo
  busdx train --data BUSI/ --out runs/vgg16 --epochs 30
  busdx train --resume runs/vgg16
  busdx evaluate --run runs/vgg16 --data BUSI/ --split test
  busdx evaluate --run runs/vgg16 --data BrEaST/ --split all --site breast
  busdx compare runs/vgg16/eval/breast-all runs/lite0/eval/breast-all
  busdx predict --run runs/vgg16 scans/ extra.png --out predictions.csv
  busdx export --run runs/vgg16 --int8
  busdx predict --run runs/vgg16 --backend onnx scans/ --out predictions.csv
  busdx predict --run runs/vgg16 scan.png --explain overlays/
  busdx serve --run runs/vgg16
  busdx predict scan.dcm --dicom-out results/   (DICOM SR and SEG; busdx[pacs])
  busdx pacs http://localhost:8042/dicom-web --watch
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``busdx`` parser: one sub-parser per command module in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="busdx",
        description="Benign vs malignant breast-ultrasound classification.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"busdx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user mistake is a one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("busdx").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if getattr(args, "any_modality", False):  # worker processes inherit it
        os.environ[ANY_MODALITY_ENV] = "1"
    try:
        return args.func(args)
    except BusdxError as exc:
        if os.environ.get("BUSDX_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"busdx: error: {message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in EXTRA_OF or os.environ.get("BUSDX_DEBUG"):
            raise
        extra = EXTRA_OF[exc.name]
        print(f"busdx: error: busdx {args.command} needs {exc.name}, which the lean install "
              f"leaves out; install the {extra} extra: pip install 'busdx[{extra}]'",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        resumes = {"train": " (it continues with --resume RUNDIR)",
                   "pacs": " (the ledger keeps what was scored: run again to go on)"}  # fmt: skip
        print(f"busdx: interrupted{resumes.get(args.command, '')}", file=sys.stderr)
        return 130
