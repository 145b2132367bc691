"""`dfs meta migrate`: move a coordinator's LMDB metadata into etcd, once, with no coordinator up.

Every sub-database's keys go to etcd under the layout the coordinator's mirror uses
(dfs/etcd/mirror.py: `/dfs/<sub-db>/<key>`), in etcd transactions of at most ETCD_MAX_TXN_OPS
operations. A migration is not one etcd transaction (a cluster's metadata is bigger than one
may be), so it first writes a `migrating` marker and deletes it with its last batch: a
coordinator refuses to lead over a marked etcd (dfs/coordinator/ha.py), and a migration that
finds one (an earlier run was interrupted) clears the prefix and starts again. The LMDB is
kept, renamed, as the backup `pre-etcd.mdb`; the directory can then be the coordinator's
cache.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any

from dfs.cli.common import add_json, command, console, etcd_url, print_json
from dfs.errors import Code, DfsError


def migrate(args: argparse.Namespace) -> int:
    from dfs.coordinator.ha import MIGRATING, PREFIX
    from dfs.db import Database
    from dfs.etcd.client import EtcdClient, prefix_end
    from dfs.meta.store import SUBDBS

    data = Path(args.data)
    if not (data / "data.mdb").exists():
        raise DfsError(Code.ENOENT, f"{data} holds no coordinator LMDB (data.mdb)")
    lock = _lock(data)
    started = time.monotonic()
    try:
        with EtcdClient.from_url(args.to) as client:
            prefix = PREFIX.encode() + b"/"
            held = client.range(prefix, prefix_end(prefix), count_only=True).count
            if held and client.get(MIGRATING) is None:
                raise DfsError(Code.EEXIST, f"etcd at {args.to} already holds dfs metadata "
                                            f"({held} keys): nothing migrated")
            if held:  # an interrupted migration: start over
                client.delete_range(prefix, prefix_end(prefix))
            client.put(MIGRATING, b"1")
            db = Database(data, SUBDBS, readonly=True)
            try:
                counts = _copy(db, client, SUBDBS, show=sys.stderr.isatty() and not args.json)
            finally:
                db.close()
        os.replace(data / "data.mdb", data / "pre-etcd.mdb")
        (data / "lock.mdb").unlink(missing_ok=True)
    finally:
        os.close(lock)
    summary: dict[str, Any] = {
        "keys": sum(counts.values()), "by_subdb": counts, "to": args.to,
        "seconds": round(time.monotonic() - started, 3),
        "backup": str(data / "pre-etcd.mdb"),
    }
    if args.json:
        print_json(summary)
    else:
        print(f"migrated {summary['keys']} keys to {args.to} in {summary['seconds']} s; "
              f"the old LMDB is kept as {summary['backup']}\n"
              f"start coordinators with: dfs coordinator --meta {args.to} --data {data}")
    return 0


def _lock(data: Path) -> int:
    """The coordinator's own data-dir lock: held, no coordinator can start meanwhile."""
    fd = os.open(data / "coordinator.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DfsError(Code.EEXIST, f"a coordinator is running on {data}: stop it "
                                    "first") from None
    return fd


def _copy(db: Any, client: Any, subdbs: list[str], *, show: bool) -> dict[str, int]:
    """Every key of every sub-db into etcd, whole etcd transactions within etcd's limits."""
    from rich.progress import Progress

    from dfs.coordinator.ha import META_PREFIX, MIGRATING
    from dfs.etcd.client import ETCD_MAX_TXN_OPS, MAX_REQUEST_BYTES, OP_OVERHEAD, op_delete, op_put
    from dfs.etcd.mirror import subdb_prefix

    counts = {name: db.read(lambda t, n=name: t.stat(db[n])["entries"]) for name in subdbs}
    batch: list[dict] = []
    size = 0

    def send(last: bool = False) -> None:
        nonlocal batch, size
        if last:
            batch.append(op_delete(MIGRATING))
        if batch and not client.txn([], batch).succeeded:
            raise DfsError(Code.INTERNAL, "an etcd transaction of the migration failed")
        batch, size = [], 0

    with Progress(console=console(stderr=True), disable=not show) as progress, \
            db.snapshot() as txn:
        task = progress.add_task("migrating keys", total=sum(counts.values()))
        for name in subdbs:
            base = subdb_prefix(META_PREFIX, name)
            for key, value in txn.cursor(db=db[name]):
                k = base + bytes(key)
                cost = len(k) + len(value) + OP_OVERHEAD
                if len(batch) + 2 > ETCD_MAX_TXN_OPS or size + cost > MAX_REQUEST_BYTES - 4096:
                    send()
                batch.append(op_put(k, bytes(value)))
                size += cost
                progress.advance(task)
        send(last=True)
    return counts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    meta = subparsers.add_parser("meta", help="the coordinator's metadata store")
    meta_commands = meta.add_subparsers(dest="meta_command", required=True, metavar="COMMAND")
    p = command(meta_commands, "migrate", migrate,
                "move a coordinator's LMDB metadata into etcd (no coordinator may run)",
                subject="data")
    p.add_argument("--data", required=True, metavar="DIR", help="the coordinator's --data dir")
    p.add_argument("--to", required=True, type=etcd_url, metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="the etcd cluster (empty of dfs metadata)")
    add_json(p)
