"""`dfs node`: options and the process entry point of a storage node.

The CLI adds the global --coordinator / --secret-file options and calls `run(args)`;
`main_node(argv)` is the same thing standalone (`python -m storage_node.main`).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO

import lmdb
import trio

from dfs import logs, runtime, sdnotify
from dfs.cli.common import (
    DEFAULT_COORDINATOR,
    Parser,
    coordinator_list,
    env_default,
    install_tls,
    listen_address,
    peer_address,
)
from dfs.client.leader import split_addresses
from dfs.errors import DfsError
from dfs.metrics.http import add_metrics_argument
from dfs.rpc import load_secret
from storage_node.node import Node, NodeConfig
from storage_node.store import BlobStore

log = logging.getLogger("storage_node")

LOCK_FILE = "node.lock"


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The node's own options (the CLI adds --coordinator and --secret-file globally)."""
    parser.add_argument("--data", required=True, type=Path, help="data directory (LMDB env)")
    parser.add_argument(
        "--listen", type=listen_address, default="127.0.0.1:0", metavar="HOST:PORT",
        help="address to serve on (port 0: the OS picks)"
    )
    parser.add_argument(
        "--advertise", type=peer_address, default=None, metavar="HOST:PORT",
        help="address others reach this node at (default: listen)"
    )
    parser.add_argument(
        "--capacity",
        type=_nonnegative_int,
        default=None,
        help="bytes this node may hold (default: what its filesystem has)",
    )
    parser.add_argument(
        "--staged-timeout",
        dest="staged_timeout_s",
        type=_positive_float,
        default=300.0,
        help="seconds after which an idle unprepared blob is dropped (default 300)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=0.5,
        help="seconds between heartbeats to the coordinator (default 0.5)",
    )
    parser.add_argument(
        "--outcome-after",
        dest="outcome_after_s",
        type=_positive_float,
        default=10.0,
        help="seconds a prepared blob waits for its decision before asking (default 10)",
    )
    parser.add_argument(
        "--scrub-rate",
        type=_nonnegative_float,
        default=8.0,
        metavar="MB/S",
        help="background re-verification of stored blobs, MB/s (0: off; default 8)",
    )
    parser.add_argument(
        "--scrub-interval",
        type=_positive_float,
        default=86400.0,
        metavar="S",
        help="seconds between the starts of two scrub passes (default 86400)",
    )
    add_space_arguments(parser)


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_space_arguments(parser: argparse.ArgumentParser) -> None:
    """Online compaction (storage_node/compaction.py) and the space figures heartbeats carry."""
    parser.add_argument(
        "--space-interval", type=_positive_float, default=10.0, metavar="S",
        help="seconds between measures of live and on-disk bytes (default 10)")
    parser.add_argument(
        "--compact-ratio", type=_nonnegative_float, default=2.0, metavar="X",
        help="compact when the store file passes X times the pages in use (0: only on "
             "request, dfs compact; default 2)")
    parser.add_argument(
        "--compact-min-dead", type=_size, default=64 << 20, metavar="BYTES",
        help="... and the dead space passes BYTES (K/M/G suffixes; default 64M)")
    add_metrics_argument(parser)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Options (addresses checked by their parser) into a NodeConfig; DfsError (one line for
    the user) if they're wrong."""
    coordinator = getattr(args, "coordinator", None) or None
    if coordinator:
        coordinator = ",".join(split_addresses(coordinator))
    return NodeConfig(
        data=Path(args.data),
        secret=load_secret(getattr(args, "secret_file", None)),
        listen=args.listen,
        advertise=args.advertise,
        coordinator=coordinator,
        capacity=args.capacity,
        staged_timeout_s=args.staged_timeout_s,
        heartbeat=getattr(args, "heartbeat_interval", 0.5),
        outcome_after_s=getattr(args, "outcome_after_s", 10.0),
        scrub_rate=getattr(args, "scrub_rate", 8.0),
        scrub_interval=getattr(args, "scrub_interval", 86400.0),
        space_interval=getattr(args, "space_interval", 10.0),
        compact_ratio=getattr(args, "compact_ratio", 2.0),
        compact_min_dead=getattr(args, "compact_min_dead", 64 << 20),
        metrics=getattr(args, "metrics", None),
    )


def lock_data_dir(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on the data dir for the process's life: one node per dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "ab")  # noqa: SIM115 - held until the process ends
    except OSError as e:
        raise DfsError("EINVAL", f"data dir {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DfsError("EINVAL", f"data dir {path} is in use by another node") from None
    return handle


async def run_node(config: NodeConfig) -> None:
    """Run a node until SIGINT/SIGTERM; print the ready line once it serves."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        lock = lock_data_dir(config.data)
        try:
            store = await runtime.in_thread(
                lambda: BlobStore.open(config.data, capacity=config.capacity)
            )
            logs.set_node_id(store.node_id or None)  # known from an earlier registration
            try:
                async with trio.open_nursery() as nursery:
                    address = await nursery.start(Node(config, store).run)
                    print(f"dfs node listening on {address}", flush=True)
                    sdnotify.ready(f"listening on {address}")
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        break
                    nursery.cancel_scope.cancel()
            finally:
                store.close()
        finally:
            lock.close()


def setup_logging(fmt: str | None = None) -> None:
    logs.setup("node", fmt)


def _startup_error(exc: BaseException) -> BaseException | None:
    """The one user-facing error inside exc (unwrapping nursery groups), if it is one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, DfsError | OSError | lmdb.Error):
        return exc
    return None


def run(args: argparse.Namespace) -> int:
    """Run `dfs node` with parsed options; 0 after a clean stop, 1 on a startup error."""
    setup_logging(getattr(args, "log_format", None))
    try:
        config = config_from_args(args)
        trio.run(run_node, config)
    except BaseException as e:  # noqa: BLE001 - turned into one line, as §11 asks
        err = _startup_error(e)
        if err is None:
            raise
        msg = err.msg if isinstance(err, DfsError) else str(err)
        print(f"dfs node: {msg}", file=sys.stderr, flush=True)
        return 1
    return 0


def main_node(argv: list[str] | None = None) -> int:
    """Standalone entry point with the global options included."""
    parser = Parser(prog="dfs node", description="run a dfs storage node")
    add_node_arguments(parser)
    parser.add_argument(
        "--coordinator", type=coordinator_list,
        default=env_default("DFS_COORDINATOR", DEFAULT_COORDINATOR),
        help="coordinators HOST:PORT[,HOST:PORT...]; the leader is followed",
    )
    parser.add_argument("--secret-file", default=os.environ.get("DFS_SECRET_FILE"))
    for name in ("cert", "key", "ca"):
        parser.add_argument(f"--tls-{name}", default=os.environ.get(f"DFS_TLS_{name.upper()}"))
    args = parser.parse_args(argv)
    try:
        install_tls(args)
    except DfsError as e:
        print(f"dfs node: {e.msg}", file=sys.stderr, flush=True)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main_node())
