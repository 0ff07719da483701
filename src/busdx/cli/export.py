"""``busdx export``: ONNX and int8 models for fast CPU inference."""

from __future__ import annotations

import argparse
from pathlib import Path

from busdx.cli.options import Subcommands


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "export",
        help="ONNX (and int8) model for fast CPU inference",
        description="Export RUNDIR/model.pt to RUNDIR/model.onnx and, with --int8, a "
        "statically quantized RUNDIR/model.int8.onnx checked against fp32 on validation images.",
    )
    parser.add_argument("--run", required=True, metavar="RUNDIR|MODEL",
                        help="a run directory, or a bundled model's name (exported into a copy "
                        "under busdx-output/MODEL, checked on --data)")  # fmt: skip
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--int8", action="store_true", help="also write an int8 model")
    parser.add_argument(
        "--calibration", metavar="DIR", help="calibration images (default: training split)"
    )
    parser.add_argument("--calibration-size", type=int, default=100, metavar="N")
    parser.add_argument(
        "--int8-weight-bits", type=int, choices=[7, 8], default=7,
        help="7 (default) runs on any x86-64 CPU; 8 keeps compact models such as "
        "EfficientNet-Lite closer to fp32, and is used only on CPUs with VNNI or AMX",
    )  # fmt: skip
    parser.add_argument(
        "--data", help="the run's dataset folder, if it has moved; labelled images to check a "
        "bundled model's export on",
    )  # fmt: skip
    parser.add_argument(
        "--max-auc-drop", type=float, default=0.01,
        help="refuse an int8 model whose validation AUC drops more (default 0.01)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-auc-drop", action="store_true", help="keep the int8 model whatever its AUC"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.workflows.export import export_run, format_export

    report = export_run(
        args.run,
        int8=args.int8,
        calibration_dir=args.calibration,
        calibration_size=args.calibration_size,
        data_root=args.data,
        max_auc_drop=args.max_auc_drop,
        force=args.allow_auc_drop,
        weight_bits=args.int8_weight_bits,
    )
    print(format_export(Path(report.source).parent, report))
    return 0
