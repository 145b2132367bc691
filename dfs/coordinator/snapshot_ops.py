"""Snapshot op handlers (docs/protocol.md, "Coordinator ops"; docs/coordinator.md, "Snapshots").

Creating a snapshot of 10^5 files must not stall every writer for the seconds a copy takes,
so it is not one write transaction: the subtree is read in ONE read transaction (LMDB's MVCC
snapshot: one point in time, so a multi-file commit is wholly in or wholly out) on a worker
thread, then written in pieces of SNAPSHOT_PIECE keys, each its own group commit, while the
snapshot is "creating" and invisible. The GC's barrier is held from before the read until the
last piece: no copy the read saw can be deleted before the snapshot's holders are written.
The last write marks it ready (forced). A crash before that leaves a "creating" snapshot,
dropped at the next start like one being deleted.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import lmdb
import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.failpoints import failpoint
from dfs.meta import MetaStore
from dfs.meta.restore import restore_snapshot
from dfs.meta.snapshots import Snapshot
from dfs.rpc import Request

from .config import CoordinatorConfig
from .gc import GarbageCollector

log = logging.getLogger(__name__)

Reply = dict[str, Any]


class SnapshotOps:
    store: MetaStore
    gc: GarbageCollector
    config: CoordinatorConfig

    def _root(self, txn: lmdb.Transaction, path: str) -> Any:
        ns = self.store.namespace
        return ns.inodes.get_dir(txn, ns.resolve(txn, path)["ino"])

    async def op_snapshot_create(self, req: Request) -> Reply:
        path, name = req.str("path"), req.name()
        store = self.store
        snapshots = store.namespace.snapshots
        started = trio.current_time()
        snapshot: Snapshot = await store.db.write(
            lambda t: snapshots.begin(t, self._root(t, path), name, path, runtime.wall_ns()))
        try:
            async with self.gc.barrier:
                puts, inodes, total = await runtime.in_thread(
                    functools.partial(self._collect, snapshot))
                read_s = trio.current_time() - started
                size = self.config.snapshot_piece
                for i in range(0, len(puts), size):
                    piece = puts[i:i + size]
                    await store.db.write(lambda t, p=piece: snapshots.put_piece(t, p),
                                         durable=False, divisible=True)
                    await failpoint("snapshot.after_piece")
                done = await store.db.write(
                    lambda t: snapshots.finish(t, snapshot.id, inodes, total))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abandon(snapshot)
            raise
        seconds = trio.current_time() - started
        log.info("snapshot %r of %s: %d inodes, %d bytes in %.2f s (read %.2f s, %d pieces)",
                 done.name, path, inodes, total, seconds, read_s,
                 -(-len(puts) // size))
        return {"snapshot": done.to_json(), "seconds": round(seconds, 3),
                "read_seconds": round(read_s, 3), "pieces": -(-len(puts) // size)}

    def _collect(self, snapshot: Snapshot) -> tuple[list[Any], int, int]:
        with self.store.db.snapshot() as txn:
            return self.store.namespace.snapshots.collect(txn, snapshot.id, snapshot.root)

    async def op_snapshot_list(self, req: Request) -> Reply:
        path = req.str("path", required=False)
        store = self.store

        def read(t: lmdb.Transaction) -> list[dict[str, Any]]:
            root = None if path is None else self._root(t, str(path)).ino
            return [s.to_json() for s in store.namespace.snapshots.list(t, root)
                    if s.state == "ready"]

        return {"snapshots": store.db.read(read)}

    async def op_snapshot_delete(self, req: Request) -> Reply:
        path, name = req.str("path"), req.name()
        snapshots = self.store.namespace.snapshots
        gone = await self.store.db.write(
            lambda t: snapshots.unname(t, self._root(t, path).ino, name))
        pieces = await self._drop(gone.id)
        return {"snapshot": gone.to_json(), "pieces": pieces}

    async def op_snapshot_restore(self, req: Request) -> Reply:
        """The live subtree becomes what the snapshot holds: one forced transaction, so no
        reader sees a mix (dfs/meta/restore.py)."""
        path, name = req.str("path"), req.name()
        ns = self.store.namespace

        def write(t: lmdb.Transaction) -> dict[str, Any]:
            root = self._root(t, path)
            found = ns.snapshots.find(t, root.ino, name)
            if found is None:
                raise DfsError(Code.ENOENT, f"{path} has no snapshot named {name.decode()!r}")
            return {"snapshot": found.to_json(),
                    **restore_snapshot(ns, t, found, runtime.wall_ns())}

        return await self.store.db.write(write)

    async def _drop(self, snap: int) -> int:
        """Drop a snapshot's keys in pieces; its blobs' copies nothing else names go to GC."""
        store = self.store
        snapshots, inodes = store.namespace.snapshots, store.namespace.inodes
        pieces = 0
        while True:
            pieces += 1
            now = runtime.wall_ns()
            if await store.db.write(
                    lambda t, n=now: snapshots.drop_piece(t, snap, n, inodes.lists),
                    durable=False):
                return pieces

    async def _abandon(self, snapshot: Snapshot) -> None:
        """A snapshot that will not be finished: unnamed, then dropped (or, if the store
        fails now, dropped at the next start)."""
        snapshots = self.store.namespace.snapshots
        try:
            if snapshot.state != "deleting":
                name = snapshot.name.encode("utf-8", "surrogateescape")
                await self.store.db.write(lambda t: snapshots.unname(t, snapshot.root, name))
            await self._drop(snapshot.id)
        except DfsError as e:
            log.warning("snapshot %r not dropped now (at the next start): %s", snapshot.name,
                        e.msg)

    async def drop_unfinished(self) -> None:
        """At start: snapshots a crash left creating or deleting are dropped."""
        for snapshot in self.store.db.read(self.store.namespace.snapshots.unfinished):
            log.info("dropping snapshot %r left %s by a crash", snapshot.name, snapshot.state)
            await self._abandon(snapshot)
