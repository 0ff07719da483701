"""``busdx train``: train a model into a new run directory, or resume one."""

from __future__ import annotations

import argparse

from busdx.cli.options import Subcommands, add_common, add_config_options, overrides
from busdx.errors import ExportError


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "train",
        help="train a model (default recipe: vgg16-frozen)",
        description="Train a model; writes a complete run directory.",
    )
    parser.add_argument(
        "--data", action="append",
        help="dataset folder (train/validation/<class> or <class>/) or labels table; repeat "
        "it, optionally as NAME=DIR, for several sites",
    )  # fmt: skip
    parser.add_argument("--out", help="new run directory (default runs/<recipe>-<time>)")
    parser.add_argument("--resume", metavar="RUNDIR", help="continue an interrupted run")
    parser.add_argument(
        "--export", action="store_true",
        help="then export ONNX and int8 (what predict and serve use by default on a CPU)",
    )  # fmt: skip
    add_config_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.evaluation.evaluate import format_metrics
    from busdx.workflows.export import export_run, format_export
    from busdx.workflows.pipeline import train_run

    result, run_dir = train_run(
        args.data, args.out, resume=args.resume, config_file=args.config, recipe=args.recipe,
        overrides=overrides(args), progress=not args.no_progress,
    )  # fmt: skip
    if result is None:  # a helper process of torchrun
        return 0
    print(format_metrics(result))
    print(f"run directory: {run_dir}")
    if args.export:
        try:
            print(format_export(run_dir, export_run(run_dir, int8=True)))
        except ExportError as exc:  # the int8 guard: the fp32 export stands
            print(f"int8 not kept: {exc}")
    return 0
