"""Command-line interface: ``busdx train | evaluate | predict | export | serve | cv | ...``.

One module per command, each registering its own sub-parser with :func:`register` and running
it with :func:`run`; :mod:`busdx.cli.options` holds the options several commands share and
:mod:`busdx.cli.main` assembles the parser and turns a :class:`~busdx.errors.BusdxError` into a
one-line message and exit code 2 (``BUSDX_DEBUG=1`` shows its traceback). A command only
parses, calls one library function and prints: the rules live in the library. Commands that
train (train, cv, export, adapt, demo) import their library when they run, so that predict,
serve, evaluate and the rest start without torch (tests/test_architecture.py).
"""

from busdx.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
