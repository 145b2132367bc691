"""What every `dfs` command shares: global options, the client, errors, output, progress."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from dfs.errors import Code, DfsError
from dfs.logs import FORMATS

if TYPE_CHECKING:
    from dfs.client import Client

DEFAULT_COORDINATOR = "127.0.0.1:7700"
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
# How long a command keeps retrying idempotent requests while the cluster is unreachable
# (--retry-for, env DFS_RETRY_FOR): long enough to ride through a coordinator failover.
CLI_RETRY_FOR = 5.0

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (exit 2), like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class UsageError(Exception):
    """Bad usage found after parsing (a relative cluster path, say): exit status 2."""


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--coordinator, --secret-file, --tls-* and --log-format, accepted before and after the
    command name.

    On subcommands the defaults are SUPPRESS so a value given before the command survives.
    """

    def default(value: str | None) -> str | None:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--coordinator",
        type=coordinator_list,
        metavar="HOST:PORT[,...]",
        default=default(env_default("DFS_COORDINATOR", DEFAULT_COORDINATOR)),
        help="the cluster's coordinators, comma-separated: the leader among them is found and "
             "followed (env DFS_COORDINATOR, default 127.0.0.1:7700)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        default=default(os.environ.get("DFS_SECRET_FILE")),
        help="the cluster secret (env DFS_SECRET_FILE)",
    )
    for name, what in (("cert", "this process's certificate (PEM)"),
                       ("key", "its private key (PEM)"),
                       ("ca", "the cluster's CA certificate: peers must be signed by it")):
        parser.add_argument(
            f"--tls-{name}",
            metavar="FILE",
            default=default(os.environ.get(f"DFS_TLS_{name.upper()}")),
            help=f"TLS on every link: {what} (env DFS_TLS_{name.upper()}; "
                 "docs/operations.md, TLS)",
        )
    parser.add_argument(
        "--retry-for",
        type=_seconds,
        metavar="S",
        default=default(os.environ.get("DFS_RETRY_FOR") or str(CLI_RETRY_FOR)),
        help="seconds to keep retrying while the cluster is unreachable (a failover, a "
             f"restart), then fail (env DFS_RETRY_FOR, default {CLI_RETRY_FOR:g})",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=default(os.environ.get("DFS_LOG_FORMAT") or "text"),
        help="log lines on stderr: text (default) or json, one object per line "
             "(env DFS_LOG_FORMAT)",
    )


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds in [low, high], else a one-line usage error."""

    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(f"{value}: want {low:g} to {high:g} seconds")
        return seconds

    return parse


_seconds = seconds_between(0, 3600)


class FromEnv(str):
    """An option's default taken from an environment variable: a bad one is named as such
    (the user typed no option)."""

    variable: str

    def __new__(cls, value: str, variable: str) -> FromEnv:
        self = super().__new__(cls, value)
        self.variable = variable
        return self


def env_default(variable: str, fallback: str) -> str:
    """$variable if set and not empty, marked as coming from there (FromEnv), else fallback."""
    value = os.environ.get(variable)
    return FromEnv(value, variable) if value else fallback


def option_source(value: str, option: str) -> str:
    """How to name where a value came from in a message: the variable or the option."""
    return value.variable if isinstance(value, FromEnv) else option


def address_type(*, listen: bool = False, many: bool = False) -> Callable[[str], str]:
    """An argparse type for every HOST:PORT option (--coordinator, --listen, --advertise,
    --metrics, the endpoints of etcd_url): rpc.parse_address on each address, so a list where one
    address is meant, a bad port, an empty host or garbage is a one-line usage error (exit 2)
    naming the option, or the variable it came from, before anything starts. `listen`: port
    0 allowed (the OS picks one); `many`: a comma-separated list. The value is kept as given."""

    def parse(value: str) -> str:
        from dfs.rpc import parse_address

        try:
            for address in value.split(",") if many else [value]:
                if parse_address(address.strip())[1] == 0 and not listen:
                    raise DfsError(Code.EINVAL, f"bad address {address!r}: port 0 is only "
                                                "for listening (the OS picks one)")
        except DfsError as e:
            where = f" (from {value.variable})" if isinstance(value, FromEnv) else ""
            raise argparse.ArgumentTypeError(e.msg + where) from None
        return value

    return parse


listen_address = address_type(listen=True)
peer_address = address_type()
coordinator_list = address_type(many=True)


def etcd_url(value: str) -> str:
    """An argparse type: etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS), each endpoint
    checked as every other address is (--meta, dfs meta migrate --to)."""
    scheme = next((s for s in ("etcd://", "etcds://") if value.startswith(s)), None)
    endpoints = value.removeprefix(scheme).split(",") if scheme else []
    if not endpoints or not all(endpoints):
        raise argparse.ArgumentTypeError(
            f"{value!r}: want etcd://HOST:PORT[,HOST:PORT...] (etcds://... for TLS)")
    for endpoint in endpoints:
        peer_address(endpoint)
    return value


def install_tls(args: argparse.Namespace) -> None:
    """Every link this process opens or serves uses the --tls-* settings (none: plain TCP,
    frames MACed). A bad file is a DfsError: one line."""
    from dfs import tls

    tls.install(tls.from_options(getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                                 getattr(args, "tls_ca", None)))


GLOBAL_OPTIONS = Parser(add_help=False)
add_global_options(GLOBAL_OPTIONS, suppress=True)


def command(
    subparsers: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    help: str,
    *,
    subject: str | Callable[[argparse.Namespace], str] = "path",
    **kw: Any,
) -> argparse.ArgumentParser:
    """A subcommand that also accepts the global options after its name.

    `subject` names the argument a failure is about ("dfs: SUBJECT: why"); without such an
    argument it is the coordinator's address.
    """
    parser = subparsers.add_parser(name, help=help, description=help, parents=[GLOBAL_OPTIONS], **kw)
    parser.set_defaults(func=handler, subject=subject)
    return parser


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


# ---------------------------------------------------------------- running client commands


def with_client(fn: Callable[[Client, argparse.Namespace], Awaitable[int | None]]) -> Handler:
    """Make an async `fn(client, args)` a command handler: secret, client, trio.run."""

    def handler(args: argparse.Namespace) -> int:
        import trio

        from dfs.client import Client
        from dfs.rpc import load_secret

        secret = load_secret(args.secret_file)

        async def run() -> int:
            retry_for = float(getattr(args, "retry_for", CLI_RETRY_FOR))
            async with Client(args.coordinator, secret, retry_for=retry_for) as client:
                return await fn(client, args) or 0

        return trio.run(run)

    return handler


def reason(error: BaseException) -> str:
    """The one-line why of a failure, as printed after 'dfs: SUBJECT: '."""
    if isinstance(error, DfsError):
        if error.msg and error.msg != error.code.value:
            text = error.msg
        elif error.code.value.startswith("E"):
            text = os.strerror(error.errno)
        else:
            text = error.code.value.replace("_", " ").lower()
        return f"{text} ({error.code.value})".replace("\n", " ")
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error).replace("\n", " ") or type(error).__name__


def fail(subject: str, error: BaseException) -> int:
    why = reason(error)
    if why.startswith(f"{subject}: "):  # a connection error names the address already
        why = why[len(subject) + 2 :]
    print(f"dfs: {subject}: {why}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- cluster paths


def cluster_path(path: str) -> str:
    """A normalized absolute cluster path; a relative one is a usage error."""
    if not path.startswith("/"):
        raise UsageError(f"{path}: cluster paths start with /")
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/")


def split(path: str) -> tuple[str, bytes]:
    """(parent path, entry name) of a cluster path other than /."""
    parent, name = posixpath.split(cluster_path(path))
    if not name:
        raise DfsError(Code.EINVAL, "the root directory has no parent")
    return parent, os.fsencode(name)


def join(path: str, name: str | bytes) -> str:
    return posixpath.join(cluster_path(path), os.fsdecode(name))


# ---------------------------------------------------------------- output


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def console(stderr: bool = False) -> Any:
    """A rich Console; not being a terminal, it must not fold tables to 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 10_000, soft_wrap=True)


def show(renderable: Any) -> None:
    """Print a rich table (or any renderable) on stdout; no trailing padding into pipes."""
    out = console()
    if sys.stdout.isatty():
        out.print(renderable, highlight=False)
        return
    with out.capture() as captured:
        out.print(renderable, highlight=False)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def size_text(n: int | None) -> str:
    from rich.filesize import decimal

    return "-" if n is None else decimal(n)


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A transfer bar on stderr for big files when stderr is a terminal; else a no-op."""
    if not (enabled and sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES):
        yield lambda done: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)
