"""``busdx cv``: grouped stratified k-fold cross-validation, or leave one site out."""

from __future__ import annotations

import argparse

from busdx.cli.options import Subcommands, add_common, add_config_options, overrides
from busdx.layout import CV_METRICS_FILE, CV_ROC_CURVE


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "cv",
        help="grouped stratified k-fold cross-validation",
        description="Cross-validate a recipe with near-duplicate groups kept within one fold; "
        "re-running the same command resumes unfinished folds.",
    )
    parser.add_argument(
        "--data", required=True, action="append",
        help="dataset folder; repeat it, optionally as NAME=DIR, for several sites",
    )  # fmt: skip
    parser.add_argument(
        "--group-by", choices=("duplicates", "site"), default="duplicates",
        help="folds keep near-duplicate groups whole (default), or leave one site "
        "out per fold (--folds is then the number of sites)",
    )  # fmt: skip
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--out", help="output folder (default runs/cv-<recipe>)")
    add_config_options(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.workflows.crossval import format_cv, run_cv

    summary, out = run_cv(
        args.data, args.out, config_file=args.config, recipe=args.recipe,
        overrides=overrides(args), n_folds=args.folds, group_by=args.group_by,
        progress=not args.no_progress,
    )  # fmt: skip
    print(format_cv(summary))
    print(f"written to {out} ({CV_METRICS_FILE}, {CV_ROC_CURVE}, fold-*/)")
    return 0
