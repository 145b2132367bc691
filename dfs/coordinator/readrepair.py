"""Read repair: bad replicas reported by readers (`report_bad`) and by node scrubs
(`report_corrupt`) are queued durably and repaired in the background, without waiting for the
next `dfs check`.

The commit driver reports here too a replica that refused its COMMIT (`refused_commit`): the
decision keeps owing that replica's ack until the repair re-lists or drops the copy. A repair
that is "fixed" takes the entry off the queue, and if the node refuses the new COMMIT too the
driver reports it afresh: such a replica is repaired again only after a backoff that grows with
each refusal of the same (node, blob), remembered across the fixes that did not stick (at most
REFUSALS_REMEMBERED pairs, each for REFUSAL_MEMORY_S after its last refusal), and logged once.

A report is written to the `repairs` queue (forced) before it is acknowledged; the worker then
repairs the named copy in place through `Replicator.fix`, which re-verifies it first (a false
alarm costs a verification, nothing more). An entry leaves the queue once the copy is fixed or
found good, the file moved on, or the file turned out lost (no good copy anywhere: logged, and
left to the operator; `dfs check` names it). Failures are retried with backoff; a report for a
node that is down waits for it (or for re-replication to move its replicas away).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import lmdb
import trio

from dfs import runtime
from dfs.meta import MetaStore, RepairEntry

from .membership import Membership
from .replicate import Replicator

log = logging.getLogger(__name__)

INTERVAL = 1.0
BATCH = 1000
CONCURRENCY = 16
DOWN_RETRY_S = 5.0
MAX_BACKOFF_S = 60.0
# A replica refusing COMMIT again after its repair waits REFIX_BACKOFF_S, doubling per refusal
# (at most MAX_BACKOFF_S), before it is repaired again.
REFIX_BACKOFF_S = 2.0
REFUSALS_REMEMBERED = 10_000
REFUSAL_MEMORY_S = 600.0


class RepairWorker:
    def __init__(self, store: MetaStore, membership: Membership, replicator: Replicator) -> None:
        self.store = store
        self.membership = membership
        self.replicator = replicator
        self.fixed = 0
        self.lost = 0
        self._wake = trio.Event()
        # (node, blob) -> (refusals of its COMMIT so far, wall ns of the last), oldest first.
        self._refusals: OrderedDict[tuple[int, int], tuple[int, int]] = OrderedDict()

    # ------------------------------------------------------------ reports

    async def report_client(self, ino: int, version: int, node: int, reason: str) -> bool:
        """A reader met a bad copy of (ino, version) on `node`; False if it no longer matters
        (the file moved on, or the node is not one of its replicas)."""
        inode = self.store.db.read(lambda t: self.store.namespace.inodes.find(t, ino))
        if inode is None or inode.version != version or inode.blob is None \
                or node not in inode.replicas:
            return False
        await self._add([RepairEntry(node, inode.blob, ino, reason, "client", runtime.wall_ns())])
        return True

    async def report_blobs(self, node: int, blobs: list[int], reason: str, source: str,
                           ino: int = 0) -> None:
        now = runtime.wall_ns()
        await self._add([RepairEntry(node, b, ino, reason, source, now) for b in blobs])

    async def refused_commit(self, node: int, blob: int, ino: int, reason: str) -> None:
        """A replica refused the COMMIT of its file's blob: its copy is bad or gone, and the
        decision keeps owing its ack until the repair re-lists (or drops) it. The first
        refusal is repaired at once; one after a repair that did not stick waits (backoff)."""
        now = runtime.wall_ns()
        count, last = self._refusals.pop((node, blob), (0, 0))
        count = 1 if now - last > REFUSAL_MEMORY_S * 1e9 else count + 1
        self._refusals[(node, blob)] = (count, now)
        while len(self._refusals) > REFUSALS_REMEMBERED:
            self._refusals.popitem(last=False)
        entry = RepairEntry(node, blob, ino, reason, "commit", now)
        if count > 1:
            delay = min(MAX_BACKOFF_S, REFIX_BACKOFF_S * 2.0 ** (count - 2))
            entry.not_before_ns = now + int(delay * 1e9)
        if count == 2:
            log.warning("node %d keeps refusing COMMIT of blob %d (ino %d) after its repair "
                        "(%s); repairing it again with backoff, at most every %g s", node,
                        blob, ino, reason, MAX_BACKOFF_S)
        await self._add([entry])

    async def suspects(self, ino: int, blob: int, nodes: list[int]) -> None:
        """Copies that proved bad while another copy of the file was being repaired."""
        now = runtime.wall_ns()
        await self._add([RepairEntry(n, blob, ino, "proved bad as a repair source", "repair",
                                     now) for n in nodes])

    async def _add(self, entries: list[RepairEntry]) -> None:
        if not entries:
            return
        queue = self.store.repairs
        await self.store.db.write(lambda t: [queue.add(t, e) for e in entries], divisible=True)
        self._wake.set()

    def pending(self) -> int:
        return self.store.db.read(self.store.repairs.count)

    # ------------------------------------------------------------ the worker

    async def run(self) -> None:
        while True:
            with trio.move_on_after(INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.drain_once()

    async def drain_once(self) -> int:
        """One pass over the due entries; returns how many left the queue."""
        now = runtime.wall_ns()
        entries = [e for e in self.store.db.read(lambda t: self.store.repairs.page(t, BATCH))
                   if e.not_before_ns <= now]
        if not entries:
            return 0
        if any(not e.ino for e in entries):
            await self._resolve(entries)
        done = [0]
        limit = trio.Semaphore(CONCURRENCY)

        async def one(entry: RepairEntry) -> None:
            async with limit:
                done[0] += await self._handle(entry)

        async with trio.open_nursery() as nursery:
            for entry in entries:
                nursery.start_soon(one, entry)
        return done[0]

    async def _resolve(self, entries: list[RepairEntry]) -> None:
        """Scrub reports name a blob only: the blob index names the inode that holds it."""
        inodes = self.store.namespace.inodes

        def read(txn: lmdb.Transaction) -> None:
            for e in entries:
                if not e.ino and (holders := inodes.holders(txn, e.blob)):
                    e.ino = holders[0].ino  # the file, current or retained version

        self.store.db.read(read)

    async def _handle(self, e: RepairEntry) -> int:
        queue = self.store.repairs
        inode = self.store.db.read(
            lambda t: self.store.namespace.inodes.holder(t, e.ino, e.blob)) if e.ino else None
        if inode is None or e.node not in inode.replicas:
            await self.store.db.write(lambda t: queue.remove(t, e.node, e.blob), durable=False)
            # No longer listed (a later decision): a COMMIT the node refused is owed no more.
            await self.replicator.driver.excuse_ack(e.blob, e.node)
            return 1
        if not self.membership.is_live(e.node):
            e.not_before_ns = runtime.wall_ns() + int(DOWN_RETRY_S * 1e9)
            await self.store.db.write(lambda t: queue.put(t, e), durable=False)
            return 0
        result = await self.replicator.fix(e.ino, e.blob, [e.node])
        if result.settled or result.status == "lost":
            if result.status == "lost":
                self.lost += 1
                log.error("file ino %d has no good replica left (lost): %s", e.ino, result.msg)
            else:
                self.fixed += 1
                log.info("read repair: node %d's copy of ino %d: %s", e.node, e.ino,
                         result.status)
            await self.store.db.write(lambda t: queue.remove(t, e.node, e.blob), durable=False)
            await self.replicator.driver.excuse_ack(e.blob, e.node)  # if the file moved on
            return 1
        e.attempts += 1
        e.not_before_ns = runtime.wall_ns() + int(min(MAX_BACKOFF_S, 2.0 ** e.attempts) * 1e9)
        log.info("read repair of ino %d on node %d: %s (%s); retrying later", e.ino, e.node,
                 result.status, result.msg)
        await self.store.db.write(lambda t: queue.put(t, e), durable=False)
        return 0
