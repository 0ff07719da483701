"""``busdx predict``: probability of malignancy for image files and folders."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from busdx.bundled import DEFAULT_MODEL, resolve_run
from busdx.cli.options import Subcommands, add_common, add_precision
from busdx.data.inputs import InputSelection
from busdx.errors import ConfigError
from busdx.inference.batch import predict_images
from busdx.inference.predictor import BACKENDS

logger = logging.getLogger("busdx")


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "predict",
        help="probability of malignancy for images",
        description="Predict image files and/or folders of images.",
    )
    parser.add_argument(
        "--run", metavar="RUNDIR",
        help=f"run directory, model.pt, or a bundled model's name (default: the bundled "
        f"{DEFAULT_MODEL}; see busdx models)",
    )  # fmt: skip
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument("--out", help="write .csv or .json here (default: CSV to stdout)")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: model's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="torch backend: auto | cpu | cuda")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="auto (default): the exported int8 model when valid on a CPU, else model.pt; "
        "torch (model.pt); onnx (model.int8.onnx if exported, else model.onnx)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--workers", type=int, default=-1,
        help="processes decoding the next images while the model runs (default -1: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--shard", metavar="I/N",
        help="only every N-th image, starting at the I-th (I = 0..N-1): one job of an array",
    )  # fmt: skip
    add_precision(parser)
    _add_ray_options(parser)
    parser.add_argument(
        "--explain", metavar="OUTDIR", help="also write Grad-CAM overlays (PNG) into OUTDIR"
    )
    _add_input_options(parser)
    _add_output_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frame", default="0", metavar="N|all",
        help="DICOM frame to classify (default 0, the first), or all: one row per frame",
    )  # fmt: skip
    parser.add_argument(
        "--box", metavar="X,Y,W,H",
        help="lesion box of the one image, in its pixels (for a model trained on boxes)",
    )  # fmt: skip
    parser.add_argument(
        "--boxes", metavar="FILE",
        help="CSV of lesion boxes: a path column and x, y, w, h (or box) columns",
    )  # fmt: skip


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ray", action="store_true",
        help="run on Ray with the exported ONNX model; needs --out; resumable: re-run to "
        "finish after a failure",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", default="local", metavar="ADDRESS",
        help="local (default: start Ray on this machine), auto, or ray://host:10001",
    )  # fmt: skip
    parser.add_argument(
        "--ray-workers", type=int, default=2, help="Ray model actors (one CPU each)"
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label-out-of-scope", action="store_true",
        help="also label inputs flagged out of scope (default: probability and reason only)",
    )  # fmt: skip
    parser.add_argument(
        "--pixel-size", type=float, metavar="MM",
        help="pixel size in mm, to measure lesions in mm (a DICOM's own spacing comes first)",
    )  # fmt: skip
    parser.add_argument(
        "--dicom-out", metavar="OUTDIR",
        help="also write each DICOM frame's results as DICOM into OUTDIR: a Structured Report "
        "(TID 1500) and, where the model outlines, a Segmentation (needs busdx[pacs])",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    run_dir = resolve_run(args.run)
    if args.ray:
        return _run_on_ray(args, run_dir)
    summary = predict_images(
        run_dir, args.paths, args.out,
        selection=InputSelection(args.shard, args.frame, args.box, args.boxes),
        device=args.device, backend=args.backend, precision=args.precision,
        threads=args.threads, batch_size=args.batch_size, threshold=args.threshold,
        workers=args.workers, explain=args.explain, progress=not args.no_progress,
        label_out_of_scope=args.label_out_of_scope, pixel_size=args.pixel_size,
        dicom_out=args.dicom_out,
    )  # fmt: skip
    count = summary.predicted + summary.failed
    logger.info(
        "%d image(s) predicted, %d failed, in %.1f s (%.1f img/s, %s backend, %s)%s",
        summary.predicted, summary.failed, summary.seconds, count / summary.seconds,
        summary.backend, summary.model_file, f"; written to {args.out}" if args.out else "",
    )  # fmt: skip
    return 0


def _run_on_ray(args: argparse.Namespace, run_dir: Path) -> int:
    if not args.out:
        raise ConfigError("--ray needs --out FILE.csv or FILE.parquet (results are merged there)")
    if (args.shard or args.explain or args.precision != "fp32" or args.box or args.boxes
            or args.dicom_out):  # fmt: skip
        raise ConfigError(
            "--ray runs the exported ONNX model over all images: it does not take "
            "--shard, --explain, --precision, --box, --boxes or --dicom-out"
        )
    from busdx.workflows.cluster import predict_on_ray  # Ray: only this path needs it

    summary = predict_on_ray(
        run_dir, args.paths, args.out, address=args.ray_address, workers=args.ray_workers,
        batch_size=args.batch_size, threshold=args.threshold, progress=not args.no_progress,
    )  # fmt: skip
    logger.info(
        "%d image(s) predicted now (%d done before), %d failed in all, in %.1f s; written to %s",
        summary.predicted, summary.skipped, summary.failed, summary.seconds, args.out,
    )  # fmt: skip
    return 0
