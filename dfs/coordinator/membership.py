"""Which storage nodes exist, which are alive, and where a new file version goes.

The node table is cached in memory (it is small and read on every BEGIN); liveness is purely
in memory: a node is live while its heartbeats keep coming (docs/protocol.md: down after
--node-timeout seconds without one). Usage from heartbeats is written back lazily, without
forcing: it is advisory and the next heartbeat refreshes it.
"""

from __future__ import annotations

import logging
import random

import lmdb
import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore, NodeRecord, NodeState

log = logging.getLogger(__name__)

USAGE_FLUSH_INTERVAL = 5.0


class Membership:
    def __init__(self, store: MetaStore, node_timeout: float,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.node_timeout = node_timeout
        self.nodes: dict[int, NodeRecord] = {}
        self._heard: dict[int, float] = {}
        self._was_live: set[int] = set()
        self._dirty: set[int] = set()
        # (live bytes, on-disk bytes) each node last sent: advisory, in memory only.
        self._space: dict[int, tuple[int | None, int | None]] = {}
        self._rng = rng or random.Random()
        self.incarnation = 0  # this start's number, sent in every register/heartbeat reply

    def load(self) -> None:
        db = self.store.db
        self.nodes = {r.id: r for r in db.read(self.store.nodes.all)}

    async def start(self) -> None:
        """Load the node table and count this start (forced before the first reply, so two
        starts never share an incarnation)."""
        self.load()
        self.incarnation = await self.store.db.write(self.store.cluster.next_incarnation)

    # ------------------------------------------------------------ queries

    def is_live(self, node_id: int) -> bool:
        record = self.nodes.get(node_id)
        heard = self._heard.get(node_id)
        return (record is not None and record.state is not NodeState.REMOVED
                and heard is not None and trio.current_time() - heard <= self.node_timeout)

    def silent_for(self, node_id: int, since: float) -> float:
        """Seconds since the node was last heard from (since `since` if never, in this
        incarnation: after a restart a dead node's clock starts at the restart)."""
        heard = self._heard.get(node_id)
        return trio.current_time() - (since if heard is None else max(heard, since))

    def state(self, node_id: int) -> NodeState:
        """The state to report: removed and draining as stored, else up or down by liveness."""
        record = self.nodes[node_id]
        if record.state in (NodeState.REMOVED, NodeState.DRAINING):
            return record.state
        return NodeState.UP if self.is_live(node_id) else NodeState.DOWN

    def address(self, node_id: int) -> str | None:
        record = self.nodes.get(node_id)
        return record.address if record else None

    def describe(self) -> list[dict]:
        now = trio.current_time()
        out = []
        for record in sorted(self.nodes.values(), key=lambda r: r.id):
            heard = self._heard.get(record.id)
            out.append({
                "id": record.id,
                "address": record.address,
                "state": str(self.state(record.id)),
                "used": record.used,
                "capacity": record.capacity,
                # blob data stored / the store's file sizes: their gap is what compaction frees
                "live": self._space.get(record.id, (None, None))[0],
                "on_disk": self._space.get(record.id, (None, None))[1],
                "last_seen_s": None if heard is None else round(now - heard, 3),
            })
        return out

    def place(self, count: int, exclude: list[int] | tuple[int, ...] = ()) -> list[NodeRecord]:
        """`count` live, up (not draining) nodes, most free space first, ties at random."""
        skip = set(exclude)
        live = [r for r in self.nodes.values()
                if r.state is NodeState.UP and r.id not in skip and self.is_live(r.id)]
        if len(live) < count:
            note = f" (excluding {sorted(skip)})" if skip else ""
            raise DfsError(Code.UNAVAILABLE, f"need {count} live nodes, have {len(live)}{note}")
        ranked = sorted(live, key=lambda r: (r.used - r.capacity, self._rng.random()))
        return ranked[:count]

    # ------------------------------------------------------------ changes

    async def register(self, node_id: int, address: str, capacity: int, used: int,
                       token: str = "") -> NodeRecord:
        store = self.store
        record = await store.db.write(lambda txn: store.nodes.register(
            txn, node_id, address, capacity, used, runtime.wall_ns(), token))
        self.nodes[record.id] = record
        self._heard[record.id] = trio.current_time()
        log.info("node %d registered at %s", record.id, address)
        return record

    def heartbeat(self, node_id: int, capacity: int, used: int, *, live: int | None = None,
                  on_disk: int | None = None) -> None:
        """A beat: liveness and usage (live/on_disk None: the node did not measure them)."""
        record = self.nodes.get(node_id)
        if record is None:
            raise DfsError(Code.ENOENT, f"node {node_id} is not registered: register first")
        if record.state is NodeState.REMOVED:
            raise DfsError(Code.EPERM, f"node {node_id} was removed from the cluster")
        record.capacity, record.used = capacity, used
        self._space[node_id] = (live, on_disk)
        record.last_seen_ns = runtime.wall_ns()
        self._heard[node_id] = trio.current_time()
        self._dirty.add(node_id)

    async def set_state(self, node_id: int, state: NodeState) -> NodeRecord:
        store = self.store
        record = await store.db.write(lambda txn: store.nodes.set_state(txn, node_id, state))
        self.nodes[node_id] = record
        log.info("node %d is now %s", node_id, state)
        return record

    # ------------------------------------------------------------ background

    async def run(self) -> None:
        """Log liveness transitions and write back usage; placement reads liveness directly."""
        next_flush = trio.current_time() + USAGE_FLUSH_INTERVAL
        while True:
            await trio.sleep(min(self.node_timeout / 4, 1.0))
            live = {n for n in self.nodes if self.is_live(n)}
            for n in sorted(live - self._was_live):
                log.info("node %d is up", n)
            for n in sorted(self._was_live - live):
                log.warning("node %d is down: no heartbeat for %.1f s", n, self.node_timeout)
            self._was_live = live
            if trio.current_time() >= next_flush and self._dirty:
                next_flush = trio.current_time() + USAGE_FLUSH_INTERVAL
                await self._flush_usage()

    async def _flush_usage(self) -> None:
        dirty, self._dirty = self._dirty, set()
        records = [self.nodes[n] for n in dirty if n in self.nodes]
        store = self.store

        def write(txn: lmdb.Transaction) -> None:
            for r in records:
                store.nodes.update_usage(txn, r.id, r.capacity, r.used, r.last_seen_ns)

        try:
            await store.db.write(write, durable=False, divisible=True)
        except DfsError as e:  # the store is unavailable (etcd lost its quorum): next round
            log.warning("node usage not written back (%s): will retry", e.msg)
            self._dirty |= dirty
