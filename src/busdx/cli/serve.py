"""``busdx serve``: the web page and REST API of a model."""

from __future__ import annotations

import argparse

from busdx.bundled import DEFAULT_MODEL, resolve_run
from busdx.cli.options import Subcommands
from busdx.inference.predictor import BACKENDS

# option: (type, help); defaults and BUSDX_* variables come from busdx.serving.ServeSettings
LIMITS = {
    "--max-upload-mb": (float, "whole request body (default 20)"),
    "--max-pixels": (int, "per image (default 50,000,000)"),
    "--max-files": (int, "per /predict request (default 32)"),
    "--workers": (int, "model calls at a time (default 1)"),
    "--queue-size": (int, "waiting requests; more get 503 (default 64)"),
}


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "serve",
        help="web app and REST API",
        description="Serve a run's model: web page at /, API at /predict, /explain, /model, "
        "/health, docs at /docs. Research use only; not a medical device.",
    )
    parser.add_argument(
        "--run", metavar="RUNDIR",
        help=f"run directory or a bundled model's name (default: the bundled {DEFAULT_MODEL})",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--backend", choices=BACKENDS,
        help="auto (default: int8 ONNX when exported and valid), torch or onnx; env BUSDX_BACKEND",
    )  # fmt: skip
    parser.add_argument(
        "--api-key", help="required in the X-API-Key header (default: $BUSDX_API_KEY)"
    )
    parser.add_argument(
        "--no-api-key", action="store_true", help="allow a non-loopback host without a key"
    )
    parser.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN", help="allow this origin (CORS)"
    )
    for option, (kind, text) in LIMITS.items():
        variable = "BUSDX_" + option[2:].replace("-", "_").upper()
        parser.add_argument(option, type=kind, help=f"{text}; env {variable}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from busdx.serving import ServeSettings, serve  # FastAPI: only the server needs it

    settings = ServeSettings.from_options(
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_files=args.max_files,
        workers=args.workers,
        queue_size=args.queue_size,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin) if args.cors_origin else None,
        backend=args.backend,
    )
    serve(resolve_run(args.run), host=args.host, port=args.port, settings=settings,
          allow_no_key=args.no_api_key)  # fmt: skip
    return 0
