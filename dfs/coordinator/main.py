"""`dfs coordinator`: open the store, serve until SIGINT/SIGTERM (docs/design.md §11)."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import lmdb
import trio

from dfs import logs, sdnotify
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore
from dfs.metrics.http import start_metrics
from dfs.rpc import load_secret

from .config import CoordinatorConfig, config_from_args
from .service import CoordinatorService, coordinator_metrics

log = logging.getLogger("dfs.coordinator")

# Failures that are the operator's to fix (bad dir, port taken, no secret): one line, exit 1.
STARTUP_ERRORS = (DfsError, OSError, lmdb.Error, ValueError)


def setup_logging(fmt: str | None = None) -> None:
    logs.setup("coordinator", fmt)


def _startup_error(exc: BaseException) -> BaseException | None:
    """The operator-facing error inside exc (possibly an exception group), if that is all."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_startup_error(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    return exc if isinstance(exc, STARTUP_ERRORS) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DfsError):
        return exc.msg
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


def lock_data_dir(config: CoordinatorConfig) -> int:
    """One coordinator per data dir: a second one on the same LMDB would fork the cluster's
    history. The lock dies with the process, so a crash never leaves it behind."""
    config.data.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.data / "coordinator.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DfsError(Code.EEXIST, f"another coordinator is running on {config.data}") from None
    return fd


async def serve(store: MetaStore, config: CoordinatorConfig, secret: bytes) -> int:
    async with trio.open_nursery() as nursery:
        metrics = coordinator_metrics()
        metrics.address = await start_metrics(nursery, metrics.registry, config.metrics,
                                              "coordinator")
        service = CoordinatorService(store, config, secret, metrics)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            address = await nursery.start(service.run)
            print(f"dfs coordinator listening on {address}", flush=True)
            sdnotify.ready(f"listening on {address}")
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
        nursery.cancel_scope.cancel()
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of `dfs coordinator`; returns the exit status."""
    setup_logging(getattr(args, "log_format", None))
    try:
        config = config_from_args(args)
        secret = load_secret(getattr(args, "secret_file", None)
                             or os.environ.get("DFS_SECRET_FILE"))
        lock_data_dir(config)
        if config.meta:
            return _run_ha(config, secret)
        store = MetaStore.open(config.data, replicas=config.replicas,
                               gc_grace_ns=int(config.gc_grace * 1e9),
                               keep_versions=config.keep_versions)
    except STARTUP_ERRORS as e:
        print(f"dfs coordinator: {_describe(e)}", file=sys.stderr)
        return 1
    if store.replicas != config.replicas:
        log.warning("this cluster keeps R=%d from its first start (--replicas %d ignored)",
                    store.replicas, config.replicas)
    try:
        return _trio_run(serve, store, config, secret)
    finally:
        store.close()


def _trio_run(fn: Callable[..., Awaitable[int]], *args: Any) -> int:
    """trio.run, an operator's error (port taken, etcd unreachable) as one line: exit 1."""
    try:
        return trio.run(fn, *args)
    except BaseException as e:
        cause = _startup_error(e)
        if cause is None:
            raise
        print(f"dfs coordinator: {_describe(cause)}", file=sys.stderr)
        return 1


def _run_ha(config: CoordinatorConfig, secret: bytes) -> int:
    """--meta etcd://...: a standby until elected (dfs/coordinator/ha.py)."""
    from dfs.etcd.client import EtcdClient

    from .ha import HaCoordinator

    assert config.meta is not None
    with EtcdClient.from_url(config.meta) as client:
        return _trio_run(HaCoordinator(config, secret, client).run)
