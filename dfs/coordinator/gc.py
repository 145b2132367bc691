"""Blob garbage collection: deliver due GC-queue entries as batched `delete` calls per node.

An entry leaves the queue only once its node confirmed the delete, so a node that is down
gets its deletions when it returns (entries for it are postponed, not dropped, so they don't
block the rest of the queue). Entries for removed nodes are dropped: nobody will ask them.
Also purges ENDED transaction records past their retention.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import lmdb
import trio

from dfs import runtime
from dfs.errors import DfsError
from dfs.meta import GcEntry, MetaStore, NodeState
from dfs.rpc import Peers

from .config import CoordinatorConfig
from .membership import Membership

log = logging.getLogger(__name__)

GC_SCAN_LIMIT = 4096
DELETE_BATCH = 1000
DOWN_POSTPONE_S = 10.0
PURGE_LIMIT = 4096


class GarbageCollector:
    def __init__(self, store: MetaStore, membership: Membership, peers: Peers,
                 config: CoordinatorConfig) -> None:
        self.store = store
        self.membership = membership
        self.peers = peers
        self.config = config

    async def run(self) -> None:
        while True:
            await trio.sleep(self.config.gc_interval)
            await self.collect_once()
            await self.purge_ended()

    async def collect_once(self) -> int:
        """One pass over the due entries; returns how many deletions nodes confirmed."""
        now_ns = runtime.wall_ns()
        store = self.store
        due, relisted = store.db.read(lambda txn: self._due(txn, now_ns))
        if not due and not relisted:
            return 0
        by_node: dict[int, list[GcEntry]] = defaultdict(list)
        for entry in due:
            by_node[entry.node].append(entry)
        gone: list[GcEntry] = relisted
        later: list[GcEntry] = []
        live: dict[int, list[GcEntry]] = {}
        for node, entries in by_node.items():
            record = self.membership.nodes.get(node)
            if record is None or record.state is NodeState.REMOVED:
                gone.extend(entries)
            elif not self.membership.is_live(node):
                later.extend(entries)
            else:
                live[node] = entries
        if gone or later:
            postpone_to = now_ns + int(max(DOWN_POSTPONE_S, 3 * self.config.node_timeout) * 1e9)

            def reshuffle(txn: lmdb.Transaction) -> None:
                store.gc.remove(txn, gone)
                store.gc.postpone(txn, later, postpone_to)

            await store.db.write(reshuffle, durable=False)
        confirmed: list[GcEntry] = []
        async with trio.open_nursery() as nursery:
            for node, entries in live.items():
                nursery.start_soon(self._delete_on, node, entries, confirmed)
        if confirmed:
            # Unforced: an entry that reappears after a crash is deleted again, harmlessly.
            await store.db.write(lambda txn: store.gc.remove(txn, confirmed), durable=False)
        return len(confirmed)

    def _due(self, txn: lmdb.Transaction, now_ns: int) -> tuple[list[GcEntry], list[GcEntry]]:
        """Due entries, split off those whose inode lists that node for that blob again (a
        replica re-made where an old entry still waits): those are dropped, never delivered."""
        due: list[GcEntry] = []
        relisted: list[GcEntry] = []
        inodes = self.store.namespace.inodes
        for entry in self.store.gc.due(txn, now_ns, GC_SCAN_LIMIT):
            inode = inodes.find(txn, entry.ino) if entry.ino else None
            if inode is not None and inode.blob == entry.blob and entry.node in inode.replicas:
                relisted.append(entry)
            else:
                due.append(entry)
        return due, relisted

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
            lambda txn: txnlog.purge_ended(txn, before, PURGE_LIMIT), durable=False)
