"""``busdx demo``: synthetic data, train, evaluate, predict; no download."""

from __future__ import annotations

import argparse
from pathlib import Path

from busdx.bundled import DEFAULT_MODEL
from busdx.cli.options import Subcommands, add_common
from busdx.layout import METRICS_FILE, MODEL_FILE, ROC_CURVE, SAMPLE_PREDICTIONS, TRAINING_CURVES


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "demo",
        help="synthetic data, train, evaluate, predict",
        description="End-to-end run on generated images; no download.",
    )
    parser.add_argument(
        "--out", default="busdx-demo",
        help="parent folder; each demo writes a new <time>/ folder inside it",
    )  # fmt: skip
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.evaluation.evaluate import format_metrics
    from busdx.workflows.demo import run_demo

    demo = run_demo(args.out, n_per_class=args.n_per_class, epochs=args.epochs,
                    progress=not args.no_progress)  # fmt: skip
    print(format_metrics(demo.metrics))
    for row in demo.predictions:
        print(f"  predict {Path(row.path).name}: {row.summary()}")
    if demo.bundled_predictions:
        print(f"the bundled model {DEFAULT_MODEL} (trained on real scans) on the same files:")
    for row in demo.bundled_predictions:
        print(f"  predict {Path(row.path).name}: {row.summary()}")
    files = (TRAINING_CURVES, SAMPLE_PREDICTIONS, ROC_CURVE, METRICS_FILE, MODEL_FILE)
    print(f"demo finished in {demo.seconds:.0f} s; outputs in {demo.run_dir} ({', '.join(files)})")
    return 0
