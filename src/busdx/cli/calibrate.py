"""``busdx calibrate``: a copy of a run refitted on a site's own labelled cases."""

from __future__ import annotations

import argparse

from busdx.cli.evaluate import SPLITS
from busdx.cli.options import Subcommands, add_common
from busdx.results import SensitivityPromise


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="refit temperature and threshold on a site's own labelled cases",
        description="Copy a run into a new run directory whose temperature and decision "
        "threshold are refitted on labelled cases from the site that will use it (the "
        "original run is left unchanged). Evaluate the new run on other cases of that site.",
    )
    parser.add_argument(
        "--run",
        required=True,
        metavar="RUNDIR|MODEL",
        help="a run directory or a bundled model's name (busdx models)",
    )
    parser.add_argument("--data", required=True, help="the site's labelled images")
    parser.add_argument("--split", default="all", choices=SPLITS)
    parser.add_argument("--site", help="the site's name (default: the data folder's)")
    parser.add_argument(
        "--out", help="new run directory (default RUNDIR-<site>; busdx-output/MODEL-<site>)"
    )
    parser.add_argument(
        "--confidence", type=float, default=0.9,
        help="confidence with which the target sensitivity must hold on new cases (one-sided "
        "Clopper-Pearson; 0: the observed sensitivity alone); default 0.9",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--refit-head", action="store_true",
        help="also refit the head's last layer on these cases, anchored to the trained one "
        "(strength chosen by cross-validation; threshold from out-of-fold scores)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="e.g. evaluate.target_sensitivity=0.98"
    )
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.workflows.calibrate import calibrate_run  # rewrites model.pt: needs torch

    calibrated = calibrate_run(
        args.run, args.data, args.split, site=args.site, out=args.out,
        overrides=[f"evaluate.threshold_confidence={args.confidence}", *(args.set or [])],
        refit=args.refit_head, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip
    fitted = calibrated.fitted
    if args.refit_head:
        refit = fitted.head_refit
        print(
            "head: kept as trained (refitting did not help out of fold)"
            if refit["kept_trained_head"]
            else f"head: last layer refitted (anchor strength {refit['strength']:g}, chosen by "
            f"{refit['folds']}-fold cross-validation over the cases)"
        )
    cases, ece = fitted.cases, fitted.validation_ece
    print(
        f"calibrated on {cases['n']} cases of {calibrated.site} "
        f"({cases['n_positive']} positive): temperature {fitted.temperature:.3f}, threshold "
        f"{fitted.threshold:.3f} ({fitted.threshold_policy}); ECE "
        f"{ece['uncalibrated']:.3f} -> {ece['calibrated']:.3f}\n"
        f"new run: {calibrated.run_dir} (the original is unchanged)"
    )
    if fitted.sensitivity_promise:
        print(format_promise(fitted.sensitivity_promise, fitted.threshold_floor))
    return 0


def format_promise(promise: SensitivityPromise, floor: dict | None) -> str:
    """The threshold's promise in words: what these cases show, and what more would show."""
    lines = [
        f"promise: sensitivity >= {promise.guaranteed:.3f} with {promise.confidence:.0%} "
        f"confidence ({promise.detected} of {promise.positives} malignant cases called "
        f"malignant); sensitivity >= {promise.target:.2f} with confidence "
        f"{promise.confidence_of_target:.0%}; specificity on these cases {promise.specificity:.3f}"
    ]
    if not promise.kept and promise.positives_needed is not None:
        lines.append(
            f"  {promise.positives} malignant cases cannot show {promise.target:.2f} at "
            f"{promise.confidence:.0%} confidence: {promise.positives_needed} (all called "
            f"malignant) would, {promise.more_positives_needed} more than these"
        )
    if floor:
        lines.append(
            f"  the model's own threshold ({floor['source']}) is kept as a floor: "
            f"{floor['model']:.3f} instead of the local {floor['local']:.3f}"
        )
    return "\n".join(lines)
