"""`dfs`: the one console script for every role (docs/design.md §11).

Commands live in modules that each expose `add_parser(subparsers)`. A module listed in
OPTIONAL_COMMANDS is registered only when it exists, so a later feature (the mount, the checker,
the benchmark) plugs in by adding its module, with no change here.

Exit status: 0 done, 1 failed (one line on stderr: "dfs: SUBJECT: why"), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dfs import logs
from dfs.cli.common import Parser, UsageError, add_global_options, fail, install_tls
from dfs.errors import DfsError

COMMANDS = ("dfs.cli.servers", "dfs.cli.files", "dfs.cli.admin", "dfs.cli.local", "dfs.cli.meta",
            "dfs.cli.versions", "dfs.cli.snapshots", "dfs.cli.stats")
OPTIONAL_COMMANDS = ("dfs.cli.mount", "dfs.cli.check", "dfs.cli.bench")


def build_parser() -> Parser:
    parser = Parser(
        prog="dfs",
        description="dfs: a replicated file system with transactional whole-file writes",
        # No abbreviations at this level: it sees the command's options too, and `local up
        # --tls` would be an ambiguous prefix of the global --tls-cert/--tls-key/--tls-ca.
        allow_abbrev=False,
    )
    add_global_options(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    for name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_parser(subparsers)
    return parser


def _subject(args: argparse.Namespace) -> str:
    subject = getattr(args, "subject", "coordinator")
    if callable(subject):
        return subject(args)
    return str(getattr(args, subject, None) or args.coordinator)


def _configure_logging(args: argparse.Namespace) -> None:
    logs.setup(f"dfs {args.command}", getattr(args, "log_format", None), default_level="WARNING")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if not getattr(args, "passthrough", False):
        _configure_logging(args)  # servers set up their own logging
    try:
        install_tls(args)
        return args.func(args)
    except Exception as e:
        return _failed(args, e)
    except KeyboardInterrupt:
        print("dfs: interrupted", file=sys.stderr)
        return 130


def _failed(args: argparse.Namespace, error: Exception) -> int:
    """Exit status and the one line on stderr for a failure: never a traceback."""
    while isinstance(error, ExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, UsageError):
        print(f"dfs: {error}", file=sys.stderr)
        return 2
    if isinstance(error, DfsError):
        return fail(_subject(args), error)
    if isinstance(error, BrokenPipeError):  # `dfs cat f | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(error, OSError):
        return fail(error.filename if error.filename is not None else _subject(args), error)
    if os.environ.get("DFS_DEBUG"):
        raise error
    return fail(_subject(args), RuntimeError(f"internal error: {type(error).__name__}: {error}"))

if __name__ == "__main__":
    sys.exit(main())
