"""The real servers as simulated processes: `CoordinatorService` and `Node`, the very classes
`dfs coordinator` and `dfs node` run, over the simulated network and disks.

Only what a process takes from its host differs (dfs/runtime.py, rpc.install_network,
db.install_environments): the addresses are names, the disks are the LMDB model, and
timeouts are shortened so that retention, grace and staged timeouts are crossed many times
in one run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from dfs.coordinator.config import CoordinatorConfig
from dfs.coordinator.service import CoordinatorService
from dfs.meta import MetaStore
from dfs.sim.world import SimProcess, World
from storage_node.node import Node, NodeConfig
from storage_node.store import BlobStore

SECRET = b"s" * 32
COORDINATOR = "coord:7700"
NODE_CAPACITY = 1 << 30


@dataclass(frozen=True)
class Timing:
    """Every timeout of the run, short enough to cross many times in a minute."""

    node_timeout: float = 1.5
    vote_timeout: float = 1.0
    gc_grace: float = 2.0
    txn_timeout: float = 6.0
    commit_retry: float = 0.5
    gc_interval: float = 0.5
    txn_retention: float = 3.0
    rpc_timeout: float = 1.0
    rereplicate_after: float = 8.0
    heartbeat: float = 0.3
    staged_timeout_s: float = 8.0
    outcome_after_s: float = 1.0
    scrub_interval: float = 6.0
    keep_versions: int = 2  # every run keeps history: the GC counts kept copies too
    unwritten_lease: float = 1.5  # a crashed churner's hidden file is taken over in a run


class SimCoordinator(SimProcess):
    def __init__(self, world: World, disks: object, replicas: int, timing: Timing) -> None:
        super().__init__(world, "coord")
        self.disks = disks
        self.path = disks.root / "coordinator"  # type: ignore[attr-defined]
        self.replicas = replicas
        self.timing = timing
        self.service: CoordinatorService | None = None

    def config(self) -> CoordinatorConfig:
        t = self.timing
        return CoordinatorConfig(
            data=self.path, listen=COORDINATOR, replicas=self.replicas,
            node_timeout=t.node_timeout, vote_timeout=t.vote_timeout, gc_grace=t.gc_grace,
            txn_timeout=t.txn_timeout, commit_retry_interval=t.commit_retry,
            gc_interval=t.gc_interval, txn_retention=t.txn_retention,
            rpc_timeout=t.rpc_timeout, txid_block=16, rereplicate_after=t.rereplicate_after,
            keep_versions=t.keep_versions, snapshot_piece=8,
            unwritten_lease=t.unwritten_lease)

    async def run(self) -> None:
        config = self.config()
        store = MetaStore.open(self.path, replicas=self.replicas,
                               gc_grace_ns=int(config.gc_grace * 1e9),
                               keep_versions=config.keep_versions)
        try:
            service = CoordinatorService(store, config, SECRET)
            service.membership._rng = random.Random(self.world.rng.random())
            self.service = service
            await service.run()
        finally:
            self.service = None
            store.close()

    def on_crash(self) -> None:
        self.disks.crash(self.path)  # type: ignore[attr-defined]


class SimNode(SimProcess):
    def __init__(self, world: World, disks: object, index: int, timing: Timing) -> None:
        super().__init__(world, f"n{index}")
        self.disks = disks
        self.index = index
        self.path = disks.root / f"node-{index}"  # type: ignore[attr-defined]
        self.address = f"n{index}:7800"
        self.timing = timing
        self.node: Node | None = None
        self.removed = False  # gone for good: never restarted
        self._node_id = 0

    @property
    def node_id(self) -> int:
        """The id the coordinator gave this node (0 until its first registration)."""
        if self.node is not None and self.node.store.node_id:
            self._node_id = self.node.store.node_id
        return self._node_id

    def config(self) -> NodeConfig:
        t = self.timing
        return NodeConfig(data=self.path, secret=SECRET, listen=self.address,
                          coordinator=COORDINATOR, capacity=NODE_CAPACITY,
                          staged_timeout_s=t.staged_timeout_s, heartbeat=t.heartbeat,
                          outcome_after_s=t.outcome_after_s, scrub_rate=50.0,
                          scrub_interval=t.scrub_interval)

    async def run(self) -> None:
        store = BlobStore.open(self.path, capacity=NODE_CAPACITY)
        try:
            self.node = Node(self.config(), store)
            await self.node.run()
            await trio.sleep_forever()
        finally:
            self.node = None
            store.close()

    def restart(self) -> None:
        if not self.removed:
            super().restart()

    def on_crash(self) -> None:
        self.disks.crash(self.path)  # type: ignore[attr-defined]

    def fill_disk(self, seconds: float) -> None:
        self.world.log(f"DISK FULL {self.name} for {seconds:.2f} s")
        self.disks.fill(self.path, trio.current_time() + seconds)  # type: ignore[attr-defined]

    def rot_a_byte(self, rng: random.Random) -> tuple[int, int] | None:
        """Flip a byte of a committed chunk on this node's disk; (blob, chunk) or None."""
        hit = self.disks.rot(self.path, rng)  # type: ignore[attr-defined]
        if hit is not None:
            self.world.log(f"BITROT {self.name} blob {hit[0]} chunk {hit[1]}")
            self.disks.rotted.add((self.node_id, hit[0]))  # type: ignore[attr-defined]
        return hit
