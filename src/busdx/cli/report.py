"""``busdx report``: a run's report and model card, or a local evaluation's validation page."""

from __future__ import annotations

import argparse
from pathlib import Path

from busdx.bundled import is_bundled, output_home, resolve_run
from busdx.cli.options import Subcommands
from busdx.errors import DataError
from busdx.layout import CONFIG_FILE, EVAL_DIR, METRICS_FILE


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "report",
        help="HTML report and model card of a run; validation page of an evaluation",
        description="A run directory: write RUNDIR/report.html (self-contained) and "
        "RUNDIR/MODEL_CARD.md. An evaluation folder (busdx evaluate): write its local "
        "validation page, EVAL_DIR/validation.html. A bundled model's name: the validation "
        "page of each of its evaluations under busdx-output/MODEL/eval/.",
    )
    parser.add_argument("run", metavar="RUNDIR|EVAL_DIR|MODEL")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.evaluation.local_check import local_evaluations, write_validation_page
    from busdx.reporting.model_card import write_report

    target = Path(args.run)
    if (target / METRICS_FILE).is_file() and not (target / CONFIG_FILE).is_file():
        print(f"validation page: {write_validation_page(target)}")
        return 0
    run_dir = resolve_run(args.run)
    if not is_bundled(run_dir):
        report, card = write_report(run_dir)
        print(f"report: {report}\nmodel card: {card}")
        return 0
    evaluations = local_evaluations(run_dir)
    if not evaluations:
        raise DataError(
            f"no evaluation of {run_dir.name} under {output_home(run_dir) / EVAL_DIR}: evaluate "
            f"it on your labelled cases first (busdx evaluate --run {run_dir.name} --data DIR)"
        )
    for folder in evaluations:
        print(f"validation page: {write_validation_page(folder)}")
    return 0
