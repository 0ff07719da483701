"""``busdx models``: the models that ship with busdx."""

from __future__ import annotations

import argparse

from busdx.bundled import DEFAULT_MODEL, bundled_info, list_bundled
from busdx.cli.options import Subcommands


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "models",
        help="list the models that ship with busdx",
        description="List the bundled models (busdx predict and serve use the default one when "
        "no --run is given), with what to expect of each at a hospital it never saw.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.evaluation.local_check import describe_threshold
    from busdx.inference.predictor import load_model

    names = list_bundled()
    if not names:
        print("no bundled models in this installation of busdx")
        return 1
    for name in names:
        info = bundled_info(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {info['description']}")
        sites = ", ".join(info["trained_on"])
        print(f"  trained on: {sites}; {info['size_mb']} MB at {info['path']}")
        if info.get("outlines"):
            print("  outlines the lesion (lesion_outline, size, shape and margin in busdx predict)")
        for site, row in info.get("held_out_sites", {}).items():
            print(
                f"  expected at an unseen hospital, as measured when {site} was held out: "
                f"ROC AUC {row['roc_auc']:.3f}; sensitivity {row['sensitivity']:.3f}, "
                f"specificity {row['specificity']:.3f} at its threshold"
                + (f"; outline Dice {row['dice']:.3f}" if "dice" in row else "")
            )
        calibration = load_model(info["path"], backend="onnx").info.calibration
        print(f"  threshold {info['threshold']:.3f}: "
              f"{describe_threshold(calibration, info.get('held_out_sites'))}")  # fmt: skip
        print(f"  check it on your labelled cases: busdx evaluate --run {name} --data DIR; "
              f"busdx calibrate --run {name} --data DIR")  # fmt: skip
    print("use one with: busdx predict [--run NAME] scan.png; busdx serve [--run NAME]")
    return 0
