"""Blob garbage collection: deliver due GC-queue entries as batched `delete` calls per node.

An entry leaves the queue only once its node confirmed the delete, so a node that is down
gets its deletions when it returns (entries for it are postponed, not dropped, so they don't
block the rest of the queue). Entries for removed nodes are dropped: nobody will ask them.
Also purges ENDED transaction records past their retention.

GC against repair: an entry whose blob is still some file's current blob (the blob index
says which) names a copy a repair of that file may be making or listing again right now. Such
an entry is re-checked and delivered while the collector holds that file's lock, the one
`Replicator.fix` holds for a whole repair (plan, copies, decision, COMMIT): a repair either
finished first (its decision lists the copy: the entry is dropped, never delivered) or starts
after the delete (and copies afresh). Checking in a read transaction and deleting later would
let a repair decision list the copy in between. An entry whose blob is current nowhere needs no
lock: a superseded or unreferenced blob is never listed again (blob ids are never reused, and a
repair's decision requires the file to still hold the blob).

GC against snapshots: a snapshot copies, as of one read transaction, the blobs its files name
then; one of them may be superseded before the snapshot's holder entries are written. So a
whole pass holds `barrier`, which snapshot creation holds from before its read until its last
piece is written: no copy it took can be deleted in between (docs/coordinator.md, "Snapshots").
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import lmdb
import trio

from dfs import runtime
from dfs.errors import DfsError
from dfs.locks import KeyedLocks
from dfs.meta import GcEntry, MetaStore, NodeState
from dfs.rpc import Peers

from .config import CoordinatorConfig
from .membership import Membership

log = logging.getLogger(__name__)

GC_SCAN_LIMIT = 4096
DELETE_BATCH = 1000
GUARDED_BATCH = 256  # file locks held at once by one guarded delete
DOWN_POSTPONE_S = 10.0
PURGE_LIMIT = 4096


class GarbageCollector:
    def __init__(self, store: MetaStore, membership: Membership, peers: Peers,
                 config: CoordinatorConfig, file_locks: KeyedLocks | None = None) -> None:
        self.store = store
        self.membership = membership
        self.peers = peers
        self.config = config
        self.file_locks = file_locks or KeyedLocks()  # the Replicator's, per inode
        self.barrier = trio.Lock()  # held by each pass and by a snapshot being taken

    async def run(self) -> None:
        while True:
            await trio.sleep(self.config.gc_interval)
            try:
                await self.collect_once()
                await self.purge_ended()
            except DfsError as e:  # the store is unavailable (etcd without quorum): retry
                log.warning("GC pass not written (%s): will retry", e.msg)

    async def collect_once(self) -> int:
        """One pass over the due entries; returns how many deletions nodes confirmed."""
        async with self.barrier:
            return await self._collect_once()

    async def _collect_once(self) -> int:
        now_ns = runtime.wall_ns()
        store = self.store
        due, relisted = store.db.read(lambda txn: self._due(txn, now_ns))
        if not due and not relisted:
            return 0
        by_node: dict[int, list[tuple[GcEntry, int]]] = defaultdict(list)
        for entry, owner in due:
            by_node[entry.node].append((entry, owner))
        gone: list[GcEntry] = relisted
        later: list[GcEntry] = []
        live: dict[int, list[tuple[GcEntry, int]]] = {}
        for node, pairs in by_node.items():
            record = self.membership.nodes.get(node)
            if record is None or record.state is NodeState.REMOVED:
                gone.extend(e for e, _ in pairs)
            elif not self.membership.is_live(node):
                later.extend(e for e, _ in pairs)
            else:
                live[node] = pairs
        if gone or later:
            postpone_to = now_ns + int(max(DOWN_POSTPONE_S, 3 * self.config.node_timeout) * 1e9)

            def reshuffle(txn: lmdb.Transaction) -> None:
                store.gc.remove(txn, gone)
                store.gc.postpone(txn, later, postpone_to)

            await store.db.write(reshuffle, durable=False, divisible=True)
        confirmed: list[GcEntry] = []
        async with trio.open_nursery() as nursery:
            for node, pairs in live.items():
                free = [e for e, owner in pairs if not owner]
                guarded = [(e, owner) for e, owner in pairs if owner]
                if free:
                    nursery.start_soon(self._delete_on, node, free, confirmed)
                if guarded:
                    nursery.start_soon(self._delete_guarded, node, guarded, confirmed)
        if confirmed:
            # Unforced: an entry that reappears after a crash is deleted again, harmlessly.
            await store.db.write(lambda txn: store.gc.remove(txn, confirmed), durable=False,
                                 divisible=True)
        return len(confirmed)

    def _due(self, txn: lmdb.Transaction, now_ns: int
             ) -> tuple[list[tuple[GcEntry, int]], list[GcEntry]]:
        """Due entries with the inode whose current blob theirs is (0: none), split off those
        that inode lists on that node again (a replica re-made where an old entry still
        waits): those are dropped, never delivered. The inode comes from the blob index, not
        from the entry, so an entry queued without one is guarded all the same."""
        return self._split(txn, self.store.gc.due(txn, now_ns, GC_SCAN_LIMIT))

    def _split(self, txn: lmdb.Transaction, entries: list[GcEntry]
               ) -> tuple[list[tuple[GcEntry, int]], list[GcEntry]]:
        due: list[tuple[GcEntry, int]] = []
        relisted: list[GcEntry] = []
        inodes = self.store.namespace.inodes
        for entry in entries:
            # The blob's reference count: its file's current content and retained versions.
            holders = inodes.holders(txn, entry.blob)
            if any(entry.node in h.replicas for h in holders):
                relisted.append(entry)
            else:
                due.append((entry, holders[0].ino if holders else 0))
        return due, relisted

    async def _delete_guarded(self, node: int, pairs: list[tuple[GcEntry, int]],
                              confirmed: list[GcEntry]) -> None:
        """Entries of blobs that are still current: re-checked and deleted under the files'
        locks, so no repair decision can list the copy between the check and the delete."""
        for i in range(0, len(pairs), GUARDED_BATCH):
            batch = pairs[i:i + GUARDED_BATCH]
            async with contextlib.AsyncExitStack() as stack:
                for ino in sorted({owner for _, owner in batch}):  # one order: no deadlock
                    await stack.enter_async_context(self.file_locks.hold(ino))
                due, relisted = self.store.db.read(
                    lambda t, b=batch: self._split(t, [e for e, _ in b]))
                confirmed.extend(relisted)  # listed again: never delivered, just dropped
                if due:
                    await self._delete_on(node, [e for e, _ in due], confirmed)

    async def _delete_on(self, node: int, entries: list[GcEntry], confirmed: list[GcEntry]
                         ) -> None:
        address = self.membership.address(node)
        if address is None:
            return
        for i in range(0, len(entries), DELETE_BATCH):
            batch = entries[i:i + DELETE_BATCH]
            try:
                await self.peers[address].call("delete", timeout=self.config.rpc_timeout,
                                               blobs=[e.blob for e in batch])
            except DfsError as e:
                log.info("GC: delete of %d blobs on node %d failed, will retry: %s",
                         len(batch), node, e)
                return
            confirmed.extend(batch)
            log.debug("GC: node %d deleted %d blobs", node, len(batch))

    async def purge_ended(self) -> int:
        before = runtime.wall_ns() - int(self.config.txn_retention * 1e9)
        txnlog = self.store.txnlog
        return await self.store.db.write(
            lambda txn: txnlog.purge_ended(txn, before, PURGE_LIMIT), durable=False,
            divisible=True)
