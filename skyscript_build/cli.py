"""The ``skyscript-build`` command line: a thin layer over each stage's library function.

Each subcommand lives in ``skyscript_build/commands/<name>.py`` and defines ``HELP`` (one
line) and ``main(args) -> int``, plus ``CONFIG``, the stage's frozen config whose declared
settings are the flags (``skyscript_build.settings``; ``GROUPS`` and ``EPILOG`` shape its
``--help``), or ``add_arguments(parser)`` for a command with flags of its own. User errors
(``SkyScriptError``) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SkyScriptError
from .settings import add_arguments

__all__ = ["main", "COMMANDS"]

# Order is the order of `--help`: the stages in data-flow order, then the tools.
COMMANDS = (
    "extract",
    "plan",
    "fetch",
    "caption",
    "filter",
    "polish",
    "run",
    "report",
    "emulator",
    "orthophoto",
    "schema",
)


def _module_name(command: str) -> str:
    return f"skyscript_build.commands.{command.replace('-', '_')}"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every available subcommand, or just ``only``.

    Importing only the command that runs keeps start-up fast and keeps one command working
    while another's module is broken.
    """
    parser = argparse.ArgumentParser(
        prog="skyscript-build",
        description="Build SkyScript-style remote-sensing image-text datasets from "
        "OpenStreetMap and imagery: extract -> plan -> fetch -> caption -> filter.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS if only is None else (only,):
        try:
            module = importlib.import_module(_module_name(command))
        except ModuleNotFoundError as e:
            if e.name != _module_name(command):
                raise
            continue
        p = sub.add_parser(
            command,
            help=module.HELP,
            description=module.HELP,
            epilog=getattr(module, "EPILOG", None),
        )
        if hasattr(module, "CONFIG"):
            add_arguments(p, module.CONFIG, getattr(module, "GROUPS", None))
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(message)s"
        if not args.verbose
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Dask sets its loggers' levels from its config when `distributed` is imported (after
    # this), so the setting goes through its environment variable; workers inherit it.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if args.verbose else "warning")
    for noisy in ("distributed", "urllib3", "googleapiclient", "rasterio", "fiona", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except SkyScriptError as e:
        print(f"skyscript-build {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skyscript-build {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
