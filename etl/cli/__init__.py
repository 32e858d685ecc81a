"""The command line: argv → Settings → engine + client → one plain function → exit code.

This package is the composition root: the only place that reads configuration, sets up
logging and turns an :class:`~etl.errors.EtlError` into one line on stderr and its exit code
(a traceback only with ``--debug``). Commands are thin: the work is in ``etl.sync``,
``etl.db`` and ``etl.scheduler``, which the daemon and the tests call the same way. One module
per command group (``sync``, ``daemon``, ``verify``, ``ops``, ``simulate``), each registering
its commands; ``wiring`` holds what they share, ``logs`` the log handlers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from etl import __version__
from etl.cli import daemon, money, ops, simulate, sync, verify
from etl.cli.logs import setup_logging
from etl.cli.ops import status_lines
from etl.cli.verify import verify_lines
from etl.cli.wiring import EXIT_INTERRUPTED, Commands, Parser
from etl.config import environment, from_env
from etl.errors import EtlError, StopRequested
from etl.memory import few_malloc_arenas
from etl.sync.orders import SWITCH_INTERVAL

__all__ = ["build_parser", "main", "status_lines", "verify_lines"]

log = logging.getLogger("etl")

# The help lists the commands in this order.
_REGISTER = (
    ops.register_migrate,
    sync.register,
    daemon.register,
    verify.register,
    money.register,
    ops.register,
    simulate.register,
)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="verbose logs and tracebacks",
    )
    common.add_argument(
        "--demo",
        action="store_true",
        default=argparse.SUPPRESS,
        help="target Kalshi's demo environment (demo-api.kalshi.co)",
    )
    parser = Parser(
        prog="kalshi-etl",
        parents=[common],
        description="Sync a Kalshi trader's account (orders, queue positions, fills, "
        "settlements) into PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"kalshi-etl {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    commands = Commands(sub, common)
    for register in _REGISTER:
        register(commands)
    return parser


# The commands that pull orders, whose threads hand the GIL over more often (SWITCH_INTERVAL).
_PULLING = frozenset({"sync", "backfill", "daemon", "verify", "demo"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    if "psql" in argv:  # what follows is psql's, options included
        at = argv.index("psql")
        argv, passed_on = argv[: at + 1], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on:
        args.psql_args = passed_on
    debug = getattr(args, "debug", False)
    if args.command in _PULLING:
        sys.setswitchinterval(SWITCH_INTERVAL)
        few_malloc_arenas()
    try:
        settings = from_env(environment(), demo=getattr(args, "demo", False), cwd=Path.cwd())
        setup_logging(settings.log_format, debug=debug)
        code: int = args.func(args, settings)
        return code
    except StopRequested as exc:
        log.info("%s", exc)
        return 0
    except EtlError as exc:
        if debug:
            traceback.print_exc()
        print(f"kalshi-etl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kalshi-etl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an untranslated failure: still one line
        if debug:
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"kalshi-etl: unexpected error: {type(exc).__name__}: {detail} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
