"""``busdx adapt``: a copy of a run adapted to a site from its unlabelled images."""

from __future__ import annotations

import argparse

from busdx.cli.options import Subcommands, add_common


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "adapt",
        help="re-estimate BatchNorm statistics on a site's unlabelled images",
        description="Copy a run (or a bundled model) into a new run directory whose BatchNorm "
        "statistics are re-estimated on a site's unlabelled images (AdaBN). Opt-in: measured "
        "at three held-out hospitals it helped at none, and the site's statistics alone "
        "(--blend 1) hurt at two (docs/adaptation.md). Evaluate the copy on labelled cases of "
        "the site before using it.",
    )
    parser.add_argument("--run", required=True, metavar="RUNDIR|MODEL")
    parser.add_argument("--data", required=True, help="the site's unlabelled images")
    parser.add_argument(
        "--out", help="new run directory (default RUNDIR-adapted; busdx-output/MODEL-adapted)"
    )
    parser.add_argument(
        "--blend", type=float, default=0.5,
        help="share of the site's statistics in the new ones (1: the site's alone, AdaBN; "
        "default 0.5, the only blend measured that hurt no held-out hospital)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.workflows.adapt import adapt_run

    adapted = adapt_run(args.run, args.data, out=args.out, blend=args.blend, device=args.device,
                        progress=not args.no_progress)  # fmt: skip
    print(
        f"adapted {adapted.layers} BatchNorm layers on {adapted.images} images (blend "
        f"{args.blend:g})\nnew run: {adapted.run_dir} (the original is unchanged); temperature "
        "and threshold are as trained: evaluate it on labelled cases before use"
    )
    return 0
