"""Start a real CoordinatorService in a test, and fake storage nodes that speak the node ops.

    async with running_coordinator(tmp_path) as coord:   # or the `coord` fixtures in tests
        await coord.call("mkdir", parent=1, name=b"d", mode=0o755)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dfs import rpc
from dfs.coordinator import CoordinatorConfig, CoordinatorService
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore

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


@dataclass
class FakeNode(rpc.Service):
    """Enough of a storage node for the coordinator: votes as told and records what it got."""

    cluster: str
    coordinator: str
    node_id: int = 0
    address: str = ""
    vote: Code | None = None  # None = YES, else vote NO with this code
    vote_delay: float = 0.0
    refuse_commits: int = 0  # answer this many COMMITs with UNAVAILABLE first
    heartbeating: bool = True
    calls: list[tuple[str, int | list[int]]] = field(default_factory=list)

    def got(self, op: str) -> list[Any]:
        return [arg for name, arg in self.calls if name == op]

    async def op_prepare(self, req: rpc.Request) -> dict:
        txid = req.int("txid")
        req.int("size"), req.bytes("checksum"), req.int("nchunks")
        self.calls.append(("prepare", txid))
        await trio.sleep(self.vote_delay)
        if self.vote is not None:
            raise DfsError(self.vote, "fake node votes no")
        return {}

    async def op_commit(self, req: rpc.Request) -> dict:
        txid = req.int("txid")
        self.calls.append(("commit", txid))
        if self.refuse_commits > 0:
            self.refuse_commits -= 1
            raise DfsError(Code.UNAVAILABLE, "fake node is busy")
        return {}

    async def op_abort(self, req: rpc.Request) -> dict:
        self.calls.append(("abort", req.int("txid")))
        return {}

    async def op_delete(self, req: rpc.Request) -> dict:
        blobs = req.list("blobs")
        self.calls.append(("delete", blobs))
        return {"deleted": len(blobs)}

    async def op_stat(self, req: rpc.Request) -> dict:
        return {"blobs": {b: None for b in req.list("blobs")}}

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(rpc.serve, self, "127.0.0.1", 0, SECRET,
                                            lambda: self.cluster)
            self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            await self.register()
            nursery.start_soon(self._heartbeats)
            task_status.started()

    async def register(self) -> None:
        peer = rpc.Peer(self.coordinator, SECRET)
        try:
            reply = await peer.call("register", node_id=self.node_id, address=self.address,
                                    capacity=1000, used=self.node_id)
        finally:
            await peer.aclose()
        self.node_id = reply["node_id"]

    async def _heartbeats(self) -> None:
        while True:
            if self.heartbeating:
                peer = rpc.Peer(self.coordinator, SECRET)
                try:
                    await peer.call("heartbeat", node_id=self.node_id, capacity=1000, used=1)
                except DfsError as e:
                    if e.code is Code.ENOENT:
                        await self.register()
                finally:
                    await peer.aclose()
            await trio.sleep(0.1)


async def start_nodes(nursery: trio.Nursery, coord: Coordinator, count: int) -> list[FakeNode]:
    nodes = []
    for _ in range(count):
        node = FakeNode(coord.store.cluster_id, coord.address)
        await nursery.start(node.run)
        nodes.append(node)
    return nodes
