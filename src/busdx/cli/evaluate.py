"""``busdx evaluate``: a trained model's metrics on labelled data, with CIs."""

from __future__ import annotations

import argparse

from busdx.cli.options import Subcommands, add_common, add_precision
from busdx.inference.predictor import BACKENDS

SPLITS = ["train", "val", "test", "all"]


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="metrics of a trained model on a split",
        description="Evaluate a run's best model on labelled data.",
    )
    parser.add_argument(
        "--run",
        required=True,
        metavar="RUNDIR|MODEL",
        help="a run directory or a bundled model's name (busdx models)",
    )
    parser.add_argument(
        "--data", action="append",
        help="dataset folder (default: the run's own data); repeat it for several sites, "
        "scored site by site",
    )  # fmt: skip
    parser.add_argument(
        "--split", choices=SPLITS,
        help="default: test for the run's own data, all for data it never saw",
    )  # fmt: skip
    parser.add_argument(
        "--out", help="output folder (default RUNDIR/eval/<site>-<split>; for a bundled "
        "model busdx-output/MODEL/eval/<site>-<split>)",
    )  # fmt: skip
    parser.add_argument("--site", help="name of the images' site (default: the data folder's)")
    parser.add_argument(
        "--readers", metavar="CSV",
        help="readers' BI-RADS per image (default: DATA/labels.csv when it has the column)",
    )  # fmt: skip
    parser.add_argument("--reader-column", default="birads", help="column of reader scores")
    parser.add_argument(
        "--boxes", metavar="FILE",
        help="ROI model: lesion boxes CSV (path,x,y,w,h) instead of the data's lesion masks",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="torch", help="onnx: the exported (int8) model"
    )
    parser.add_argument(
        "--flip", action="store_true",
        help="test-time augmentation: average each answer with the mirrored image's",
    )  # fmt: skip
    add_precision(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.evaluation.evaluate import evaluate_run, format_metrics

    result, out = evaluate_run(
        args.run, args.data, args.split, site=args.site, out=args.out, readers=args.readers,
        reader_column=args.reader_column, boxes=args.boxes, device=args.device,
        backend=args.backend, precision=args.precision, flip=args.flip,
        progress=not args.no_progress,
    )  # fmt: skip
    print(format_metrics(result))
    print(f"written to {out}; a page to file: busdx report {out}")
    return 0
