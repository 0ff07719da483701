"""``busdx pacs``: score a DICOMweb server's new ultrasound instances; store SR and SEG back."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from busdx.cli.options import Subcommands, add_common
from busdx.errors import ConfigError

PASSWORD_ENV = "BUSDX_DICOMWEB_PASSWORD"


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "pacs",
        help="score a PACS's new ultrasound instances and store the results back (DICOMweb)",
        description="Find the server's instances of a modality (QIDO-RS), fetch those not yet "
        "scored (WADO-RS), predict them and store each one's Structured Report and Segmentation "
        "back (STOW-RS). A ledger file keeps what was scored, so no instance is scored twice, "
        "across restarts too. Needs busdx[pacs]. See docs/orthanc.md.",
    )
    parser.add_argument("url", help="DICOMweb root, e.g. http://localhost:8042/dicom-web")
    parser.add_argument("--run", metavar="RUNDIR|MODEL", help="default: the bundled model")
    parser.add_argument(
        "--state", metavar="FILE",
        help="ledger of scored instances (default: busdx-output/pacs/<server>.jsonl)",
    )  # fmt: skip
    parser.add_argument("--watch", action="store_true", help="poll until interrupted")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    parser.add_argument("--modality", default="US", help="which instances (default US)")
    parser.add_argument("--frame", default="0", metavar="N|all", help="frames to score")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument(
        "--user", help=f"HTTP basic authentication user; the password is read from {PASSWORD_ENV}"
    )
    add_common(parser)
    parser.set_defaults(func=run)


def default_state(url: str) -> Path:
    """``busdx-output/pacs/<host_port_path>.jsonl``: one ledger per server."""
    return (
        Path("busdx-output") / "pacs" / (re.sub(r"[^A-Za-z0-9.-]+", "_", url).strip("_") + ".jsonl")
    )


def run(args: argparse.Namespace) -> int:
    from busdx.bundled import resolve_run
    from busdx.inference.predictor import load_model
    from busdx.pacs.dicomweb import DicomWeb
    from busdx.pacs.watch import Ledger, score_new, watch

    auth = None
    if args.user:
        if PASSWORD_ENV not in os.environ:
            raise ConfigError(f"--user needs the password in the environment: {PASSWORD_ENV}")
        auth = (args.user, os.environ[PASSWORD_ENV])
    loaded = load_model(resolve_run(args.run), backend=args.backend)
    server = DicomWeb(args.url, auth=auth)
    ledger = Ledger(Path(args.state or default_state(args.url)))
    options = {"modality": args.modality, "frame": args.frame}
    if args.watch:
        watch(server, loaded, ledger, interval=args.interval, **options)
        return 0
    summary = score_new(server, loaded, ledger, **options)
    print(f"{summary.scored} instance(s) scored, {summary.failed} failed, {summary.stored} "
          f"object(s) stored in {summary.seconds:.1f} s; ledger {ledger.path}")  # fmt: skip
    return 0
