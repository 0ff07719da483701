"""``busdx audit``: class counts, broken files, duplicates and leakage of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from busdx.cli.options import Subcommands, add_common
from busdx.config import load_config
from busdx.data.audit import DEFAULT_MAX_DISTANCE, audit_dataset, write_audit
from busdx.data.datasets import apply_split_file, scan_dataset
from busdx.layout import AUDIT_HTML, AUDIT_JSON


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "audit",
        help="counts, broken files, duplicates and leakage",
        description="Audit a dataset: class counts, image sizes and modes, unreadable files, "
        "exact and near-duplicate images, and duplicates that straddle two splits.",
    )
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--split-file", help="check this split (path,label,split CSV) for leaks")
    parser.add_argument("--out", help="report folder (default audit/<data name>)")
    parser.add_argument(
        "--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
        help="perceptual-hash bits (of 63) that still count as duplicate "
        f"(default {DEFAULT_MAX_DISTANCE})",
    )  # fmt: skip
    parser.add_argument("--exclude-normal", action="store_true", help="skip normal/ folders")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config()
    dataset = scan_dataset(args.data, config.data.classes, include_normal=not args.exclude_normal)
    if args.split_file:
        dataset = apply_split_file(dataset, args.split_file)
    result = audit_dataset(dataset, max_distance=args.max_distance, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path("audit") / dataset.root.name
    write_audit(result, out)
    summary = result.summary()
    width = max(len(key) for key in summary)
    print(f"audit of {dataset.root} ({dataset.layout})")
    for key, value in summary.items():
        print(f"  {key.replace('_', ' '):<{width}}  {value}")
    if result.cross_split_pairs:
        print(f"  LEAKAGE: {len(result.cross_split_pairs)} duplicate pair(s) straddle two splits")
    print(f"report: {out / AUDIT_HTML} and {out / AUDIT_JSON}")
    return 0
