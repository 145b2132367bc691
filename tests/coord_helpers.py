"""Start a real CoordinatorService in a test, and real storage nodes (in-process) next to it.

    async with running_coordinator(tmp_path) as coord:   # or the `coord` fixtures in tests
        await coord.call("mkdir", parent=1, name=b"d", mode=0o755)
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dfs import rpc
from dfs.coordinator import CoordinatorConfig, CoordinatorService
from dfs.meta import MetaStore
from storage_node.node import Node, NodeConfig
from storage_node.store import BlobStore

SECRET = b"test-secret-" + b"x" * 32


def fast_config(data: Path, **overrides: Any) -> CoordinatorConfig:
    """Timeouts short enough for tests."""
    settings: dict[str, Any] = dict(
        data=data, listen="127.0.0.1:0", node_timeout=1.0, vote_timeout=1.0, gc_grace=0.3,
        txn_timeout=30.0, commit_retry_interval=0.1, gc_interval=0.1, rpc_timeout=2.0,
        txid_block=16)
    settings.update(overrides)
    return CoordinatorConfig(**settings)


@dataclass
class Coordinator:
    service: CoordinatorService
    store: MetaStore
    address: str
    peer: rpc.Peer

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.peer.call(op, **fields)


@asynccontextmanager
async def running_coordinator(data: Path, **overrides: Any) -> AsyncIterator[Coordinator]:
    config = fast_config(data, **overrides)
    store = MetaStore.open(data, replicas=config.replicas,
                           gc_grace_ns=int(config.gc_grace * 1e9), map_size=1 << 26)
    service = CoordinatorService(store, config, SECRET)
    try:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(service.run)
            peer = rpc.Peer(address, SECRET)
            try:
                yield Coordinator(service, store, address, peer)
            finally:
                await peer.aclose()
                nursery.cancel_scope.cancel()
    finally:
        store.close()


class RunningNode:
    """A real storage node (`storage_node.node.Node` over a `BlobStore`) in this process."""

    def __init__(self, node: Node, scope: trio.CancelScope) -> None:
        self.node = node
        self.scope = scope

    @property
    def node_id(self) -> int:
        return self.node.store.node_id

    @property
    def address(self) -> str:
        assert self.node.address is not None
        return self.node.address

    def stop(self) -> None:
        """Stop the node (its server, heartbeats and timers); its store is closed."""
        self.scope.cancel()


async def _serve_node(config: NodeConfig, *,
                      task_status: trio.TaskStatus[RunningNode] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    store = BlobStore.open(config.data, capacity=config.capacity)
    try:
        with trio.CancelScope() as scope:
            node = Node(config, store)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                assert node.link is not None
                await node.link.registered.wait()
                task_status.started(RunningNode(node, scope))
    finally:
        store.close()


async def start_nodes(nursery: trio.Nursery, coord: Coordinator, count: int,
                      capacity: int = 1000, **options: Any) -> list[RunningNode]:
    """Start `count` real storage nodes in `nursery`, registered one after another (so they get
    ids in order), each on a fresh data dir next to the coordinator's; `options` are more
    NodeConfig fields (short timeouts)."""
    data = coord.service.config.data
    nodes = []
    for _ in range(count):
        config = NodeConfig(
            data=Path(tempfile.mkdtemp(prefix=f"{data.name}-node-", dir=data.parent)),
            secret=SECRET, coordinator=coord.address, capacity=capacity,
            **{"heartbeat": 0.1, **options})
        nodes.append(await nursery.start(_serve_node, config))
    return nodes
