"""``busdx report``: a run's self-contained HTML report and model card."""

from __future__ import annotations

import argparse

from busdx.cli.options import Subcommands
from busdx.model_card import write_report


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "report",
        help="HTML report and model card of a run",
        description="Write RUNDIR/report.html (self-contained) and RUNDIR/MODEL_CARD.md.",
    )
    parser.add_argument("run", metavar="RUNDIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report, card = write_report(args.run)
    print(f"report: {report}\nmodel card: {card}")
    return 0
