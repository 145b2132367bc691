"""Coordinator ops for the checker, repair and node lifecycle (docs/checker.md).

The checker reads metadata in pages (`scan_inodes`, `scan_dentries`, `scan_gc`: thousands of
rows per round trip), confirms what it suspects (`inodes`, `entries`, `blob_refs`), and asks
for fixes (`repair_files`, `forget_blobs`, `repair_namespace`), each fix one transaction.
Nodes report what their scrub found (`report_corrupt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lmdb
import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore, TxnState, fsck
from dfs.meta.scan import PAGE_MAX, inode_row
from dfs.rpc import Request

if TYPE_CHECKING:
    from .commit import CommitDriver
    from .config import CoordinatorConfig
    from .membership import Membership
    from .readrepair import RepairWorker
    from .replicate import Replicator
    from .rereplicate import ReReplicator

Reply = dict[str, Any]
MAX_ITEMS = 10_000
MAX_REPAIRS = 1_000


def _ints(req: Request, key: str) -> list[int]:
    values = req.list(key)
    if len(values) > MAX_ITEMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DfsError(Code.BAD_REQUEST, f"{req.op}: {key!r} must be up to {MAX_ITEMS} ids")
    return values


def _pairs(req: Request, key: str, second: type) -> list[tuple[int, Any]]:
    values = req.list(key)
    if len(values) > MAX_ITEMS or not all(
            isinstance(v, list | tuple) and len(v) == 2 and isinstance(v[0], int)
            and isinstance(v[1], second) for v in values):
        raise DfsError(Code.BAD_REQUEST, f"{req.op}: {key!r} must be up to {MAX_ITEMS} pairs")
    return [(v[0], v[1]) for v in values]


class CheckOps:
    store: MetaStore
    config: CoordinatorConfig
    driver: CommitDriver
    membership: Membership
    replicator: Replicator
    rereplicator: ReReplicator
    repair_worker: RepairWorker

    # ------------------------------------------------------------ reading

    async def op_check_info(self, req: Request) -> Reply:
        store = self.store
        return {"replicas": store.replicas, "retention_s": self.config.txn_retention,
                "gc_grace_s": self.config.gc_grace, "nodes": self.membership.describe(),
                "files": store.db.read(store.namespace.inodes.count)}

    async def op_scan_inodes(self, req: Request) -> Reply:
        """A page of inodes in ino order; `brief`: only [ino, mode, indexed] per inode (the
        namespace check), where indexed says a file's blob is in the `blobs` index."""
        after, limit = req.int("after", 0), req.int("limit", 5000)
        brief = req.bool("brief")
        scan = self.store.scan

        def read(txn: lmdb.Transaction) -> list[Any]:
            page = scan.inodes(txn, after, limit)
            if brief:
                return [[i.ino, i.mode, scan.indexed(txn, i)] for i in page]
            return [inode_row(i) for i in page]

        rows = self.store.db.read(read)
        return {"inodes": rows,
                "last": rows[-1][0] if len(rows) >= min(max(limit, 1), PAGE_MAX) else None}

    async def op_scan_blobs(self, req: Request) -> Reply:
        """A page of files in current blob id order (the `blobs` index), for the checker's
        merge with the nodes' listings: rows as `scan_inodes`, last (blob id) or nil."""
        after, limit = req.int("after", 0), req.int("limit", 5000)
        scan = self.store.scan
        page, last = self.store.db.read(lambda t: scan.blob_files(t, after, limit))
        return {"inodes": [inode_row(i) for i in page], "last": last}

    async def op_scan_dentries(self, req: Request) -> Reply:
        after, limit = req.bytes("after", b""), req.int("limit", 5000)
        within = req.opt_int("within")
        rows, last = self.store.db.read(
            lambda t: self.store.scan.dentries(t, after, limit, within))
        return {"entries": rows, "last": last}

    async def op_scan_gc(self, req: Request) -> Reply:
        after, limit = req.bytes("after", b""), req.int("limit", 5000)
        rows, last = self.store.db.read(lambda t: self.store.scan.gc(t, after, limit))
        return {"entries": rows, "last": last}

    async def op_inodes(self, req: Request) -> Reply:
        inos = _ints(req, "inos")
        inodes = self.store.namespace.inodes

        def read(txn: lmdb.Transaction) -> list[Any]:
            return [None if (i := inodes.find(txn, ino)) is None else inode_row(i)
                    for ino in inos]

        return {"inodes": self.store.db.read(read)}

    async def op_entries(self, req: Request) -> Reply:
        keys = _pairs(req, "keys", bytes)
        entries = self.store.namespace.entries

        def read(txn: lmdb.Transaction) -> list[int | None]:
            return [None if (e := entries.find(txn, p, n)) is None else e.ino for p, n in keys]

        return {"inos": self.store.db.read(read)}

    def _classify(self, txn: lmdb.Transaction, node: int, blob: int) -> tuple[str, int]:
        """What the metadata says of `blob` on `node` right now, and the inode whose current
        blob it is (0 if none): inflight (a write or a repair is under way, or its COMMIT is
        owed to the node), current (that inode lists it there), or unreferenced.

        Current comes from the namespace (the blob index), never from the absence of a txn
        record: after retention every current blob has none."""
        driver = self.driver
        protocol = driver.protocol
        holders = self.store.namespace.inodes.holders(txn, blob)  # current or retained
        ino = holders[0].ino if holders else 0
        if blob in driver.open or protocol.is_in_flight(blob) \
                or blob in self.replicator.active:
            return "inflight", ino
        if protocol.is_committed(blob) and node in protocol.unacked(blob):
            return "inflight", ino
        record = self.store.txnlog.get(txn, blob)
        if record is not None and record.state is TxnState.COMMITTED \
                and node in record.unacked:
            return "inflight", ino or record.ino
        if any(node in h.replicas for h in holders):
            return "current", ino
        return "unreferenced", ino

    async def op_blob_refs(self, req: Request) -> Reply:
        pairs = _pairs(req, "blobs", int)
        return {"refs": self.store.db.read(
            lambda t: [self._classify(t, node, blob)[0] for node, blob in pairs])}

    # ------------------------------------------------------------ fixing

    async def op_repair_files(self, req: Request) -> Reply:
        """Repair each file (one transaction each, many at once); per-file results."""
        files = req.list("files")
        if len(files) > MAX_REPAIRS or not all(
                isinstance(f, list | tuple) and len(f) == 3 and isinstance(f[0], int)
                and isinstance(f[1], int | None) and isinstance(f[2], list | tuple)
                for f in files):
            raise DfsError(Code.BAD_REQUEST, "repair_files: files must be [ino, blob, [nodes]]")
        results: list[Any] = [None] * len(files)

        async def one(i: int, ino: int, blob: int | None, bad: list[int]) -> None:
            result = await self.replicator.fix(ino, blob, bad, evacuate_down=True)
            results[i] = result.to_wire()

        async with trio.open_nursery() as nursery:
            for i, (ino, blob, bad) in enumerate(files):
                nursery.start_soon(one, i, ino, blob, [int(n) for n in bad])
        return {"results": results}

    async def op_forget_blobs(self, req: Request) -> Reply:
        """Delete blobs a checker found unreferenced on a node (orphans, stale STAGED or
        PREPARED leftovers), each re-checked here and queued for GC in one transaction."""
        node, blobs = req.int("node_id"), _ints(req, "blobs")
        store = self.store
        now = runtime.wall_ns()

        def write(txn: lmdb.Transaction) -> tuple[list[int], list[list[Any]]]:
            queued, kept = [], []
            for blob in blobs:
                verdict, ino = self._classify(txn, node, blob)
                if verdict == "unreferenced":
                    # Not listed by any inode (checked in this transaction). If the blob is
                    # another node's current copy (ino known), the GC re-checks under the
                    # file's lock before it deletes: a repair may list this copy again.
                    store.gc.add(txn, now, node, blob, ino)
                    queued.append(blob)
                else:
                    kept.append([blob, verdict])
            return queued, kept

        queued, kept = await store.db.write(write, divisible=True)  # independent GC entries
        return {"queued": queued, "kept": kept}

    async def op_repair_namespace(self, req: Request) -> Reply:
        """Drop dangling entries; link inodes that have no entry into /lost+found."""
        dangling = _pairs(req, "dangling", bytes)
        unlinked = _ints(req, "unlinked")
        ns = self.store.namespace
        dropped, relinked = [], []
        for parent, name in dangling:
            if await self.store.db.write(
                    lambda t, p=parent, n=name: fsck.drop_dangling(ns, t, p, n, runtime.wall_ns())):
                dropped.append([parent, name])
        for ino in unlinked:
            name = await self.store.db.write(
                lambda t, i=ino: fsck.relink(ns, t, i, runtime.wall_ns()))
            if name is not None:
                relinked.append([ino, name])
        return {"dropped": dropped, "relinked": relinked}

    async def op_report_corrupt(self, req: Request) -> Reply:
        """A node's scrub found these of its blobs corrupt: queue their repair."""
        node, blobs = req.int("node_id"), _ints(req, "blobs")
        await self.repair_worker.report_blobs(node, blobs, req.str("reason", "scrub"), "scrub")
        return {}
