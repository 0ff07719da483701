"""``busdx compare``: a paired bootstrap of two models on the same images."""

from __future__ import annotations

import argparse
from pathlib import Path

from busdx.cli.options import Subcommands


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "compare",
        help="paired bootstrap of two models on the same images",
        description="Compare two evaluations of the same images (run directories, whose test "
        "split is evaluated at their top, folders from busdx evaluate, or busdx cv folders, "
        "pooled over their folds): ROC AUC, sensitivity and specificity of A minus B, with "
        "paired bootstrap CIs.",
    )
    parser.add_argument("a", metavar="RUN_OR_EVAL_A")
    parser.add_argument("b", metavar="RUN_OR_EVAL_B")
    parser.add_argument("--out", help="also write the result as JSON here")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.config import apply_overrides, load_config
    from busdx.evaluation.compare import compare_evaluations, format_comparison

    settings = apply_overrides(load_config(), [f"evaluate.n_bootstrap={args.n_bootstrap}"]).evaluate
    result = compare_evaluations(
        Path(args.a), Path(args.b), settings, out=Path(args.out) if args.out else None
    )
    print(format_comparison(result))
    return 0
