"""A whole storage node: the store's writer, the server, the coordinator link and the
participant's timers, all in one trio nursery.

The node serves from the first second, with or without a coordinator: registration retries
with backoff until the coordinator appears, and PREPARED blobs wait for their outcome.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lmdb
import trio

from dfs import logs
from dfs.client.leader import LeaderLink
from dfs.errors import Code, DfsError
from dfs.metrics.http import start_metrics
from dfs.metrics.node import NodeMetrics
from dfs.metrics.rpc import service_ops
from dfs.rpc import Peers, join_address, parse_address, serve
from storage_node.compaction import Compactor
from storage_node.maintenance import Scrubber
from storage_node.participant import Participant
from storage_node.server import NodeService
from storage_node.store import BlobStore

log = logging.getLogger(__name__)

REGISTER_BACKOFF_MAX = 5.0
OUTCOME_TIMEOUT = 2.0


@dataclass
class NodeConfig:
    data: Path
    secret: bytes
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    coordinator: str | None = None  # HOST:PORT, or "A,B,C": the leader among them is followed
    capacity: int | None = None
    staged_timeout_s: float = 300.0
    heartbeat: float = 0.5
    outcome_after_s: float = 10.0
    scrub_rate: float = 8.0  # MB/s of background verification; 0 turns the scrubber off
    scrub_interval: float = 86400.0  # seconds between the starts of two scrub passes
    space_interval: float = 10.0  # seconds between measures of live and on-disk bytes
    compact_ratio: float = 2.0  # compact when the file passes this many times the pages in use
    compact_min_dead: int = 64 * 1024 * 1024  # ... and the excess passes this; ratio 0: never
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics at (dfs/metrics)

    @property
    def tick(self) -> float:
        """How often timeouts are checked: often enough for short test timeouts."""
        return min(1.0, max(0.05, self.staged_timeout_s / 4))


class CoordinatorLink:
    """Registration, heartbeats every `heartbeat` seconds, and OUTCOME queries, all to the
    leading coordinator of the node's list (`LeaderLink`: a standby's NOT_LEADER re-aims them).

    Each heartbeat names the node's idle STAGED txids (`staged`) and carries back the
    coordinator's incarnation and which of them it does not know (`unknown`: presumed aborted,
    dropped at once); after a new incarnation the next beat goes out without waiting.
    """

    def __init__(
        self, peer: LeaderLink, store: BlobStore, advertise: str, *, heartbeat: float = 0.5,
        service: NodeService | None = None,
        stats: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.peer = peer
        self.store = store
        self.advertise = advertise
        self.heartbeat = heartbeat
        self.service = service
        self.stats = stats  # the node's RPC totals, carried by each beat (`dfs stats`)
        self.registered = trio.Event()
        self._reachable: bool | None = None
        self._last_error: Code | None = None

    async def run(self) -> None:
        """Register (again whenever the coordinator forgets us), then heartbeat, forever."""
        delay = 0.1
        while True:
            try:
                await self.register()
            except DfsError as e:
                self._note(False, e)
            else:
                if await self._heartbeat_until_refused():
                    delay = 0.1  # it worked for a while: not a refusal loop
            await trio.sleep(delay)
            delay = min(delay * 2, REGISTER_BACKOFF_MAX)

    async def register(self) -> None:
        reply = await self.peer.call(
            "register",
            node_id=self.store.node_id,
            token=self.store.token,
            address=self.advertise,
            capacity=self.store.capacity(),
            used=self.store.used(),
            timeout=5.0,
        )
        node_id, cluster = reply.get("node_id"), reply.get("cluster")
        if not isinstance(node_id, int) or node_id <= 0 or not isinstance(cluster, str):
            raise DfsError(Code.BAD_REQUEST, f"malformed register reply {reply!r}")
        if self.store.cluster and cluster != self.store.cluster:
            raise DfsError(
                Code.AUTH,
                f"coordinator runs cluster {cluster}; this node is of {self.store.cluster}",
            )
        if (node_id, cluster) != (self.store.node_id, self.store.cluster):
            await self.store.set_identity(node_id, cluster)
        self.peer.expect_cluster = cluster
        logs.set_node_id(node_id)
        self._note(True)
        log.info(
            "registered as node %d of cluster %s (address %s)", node_id, cluster, self.advertise
        )
        if self.service is not None:
            await self.service.coordinator_seen(reply.get("incarnation"), [])
        self.registered.set()

    async def _heartbeat_until_refused(self) -> bool:
        """Beat until the coordinator answers with an error (it forgot or removed us).

        Returns whether any beat was accepted first.
        """
        accepted = False
        hurry = True  # right after registering: name the leftovers at once
        while True:
            if not hurry:
                await trio.sleep(self.heartbeat)
            hurry = False
            staged = self.service.leftovers_to_name() if self.service is not None else []
            space = self.service.compactor.space() if self.service is not None else {}
            extra = {"stats": self.stats()} if self.stats is not None else {}
            try:
                reply = await self.peer.call(
                    "heartbeat",
                    node_id=self.store.node_id,
                    capacity=self.store.capacity(),
                    used=self.store.used(),
                    staged=staged,
                    **{k: v for k, v in space.items() if v is not None},
                    timeout=max(2.0, 4 * self.heartbeat),
                    **extra,
                )
            except DfsError as e:
                if e.code == Code.UNAVAILABLE:
                    self._note(False, e)
                    continue
                log.warning("heartbeat refused (%s); registering again", e)
                return accepted
            accepted = True
            self._note(True)
            if self.service is not None:
                hurry = await self.service.coordinator_seen(reply.get("incarnation"),
                                                            reply.get("unknown"))

    async def outcome(self, txid: int) -> str:
        # node_id: the answer is about this node's copy (a repair shares the blob's txid)
        reply = await self.peer.call("outcome", txid=txid, node_id=self.store.node_id,
                                     timeout=OUTCOME_TIMEOUT)
        state = reply.get("state")
        if not isinstance(state, str):
            raise DfsError(Code.BAD_REQUEST, f"malformed outcome reply {reply!r}")
        return state

    async def report_corrupt(self, blobs: list[int], reason: str) -> None:
        """The scrubber found these blobs rotten: the coordinator queues their repair."""
        await self.peer.call("report_corrupt", node_id=self.store.node_id, blobs=blobs,
                             reason=reason, timeout=5.0)

    def _note(self, reachable: bool, error: DfsError | None = None) -> None:
        """Log changes of the coordinator's reachability, not every failed beat."""
        code = error.code if error else None
        if reachable == self._reachable and code == self._last_error:
            return
        self._reachable, self._last_error = reachable, code
        if reachable:
            log.info("coordinator %s reachable", self.peer.address)
        else:
            log.warning("coordinator %s unreachable: %s (retrying)", self.peer.address, error)


class Node:
    """Runs a storage node over an open BlobStore until cancelled."""

    def __init__(self, config: NodeConfig, store: BlobStore) -> None:
        self.config = config
        self.store = store
        self.participant = Participant(
            staged_timeout_s=config.staged_timeout_s, outcome_after_s=config.outcome_after_s
        )
        self.service = NodeService(store, self.participant, heartbeat=config.heartbeat)
        self.service.peers = Peers(config.secret, timeout=30.0)
        self.compactor = Compactor(store, ratio=config.compact_ratio,
                                   min_dead=config.compact_min_dead)
        self.service.compactor = self.compactor
        self.metrics = NodeMetrics(self, service_ops(NodeService))
        self.service.rpc_metrics = self.metrics.rpc
        self.link: CoordinatorLink | None = None
        self.scrubber: Scrubber | None = None
        self.address: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve; task_status.started() gets the bound HOST:PORT."""
        peer: LeaderLink | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.db.run_writer)
                await self.service.restore()
                self.compactor.nursery = nursery
                if self.compactor.supported:  # not the simulator's model: it has no file
                    await self.compactor.measure()
                self.metrics.address = await start_metrics(
                    nursery, self.metrics.registry, self.config.metrics, "node")
                self.service.metrics_address = self.metrics.address
                host, port = parse_address(self.config.listen)
                try:
                    listeners = await nursery.start(
                        partial(serve, self.service, host, port, self.config.secret, self._cluster)
                    )
                except OSError as e:
                    raise DfsError(
                        Code.EINVAL, f"cannot listen on {self.config.listen}: {e.strerror or e}"
                    ) from None
                port = listeners[0].socket.getsockname()[1]
                self.address = join_address(host, port)
                if self.config.coordinator:
                    peer = LeaderLink(
                        self.config.coordinator,
                        self.config.secret,
                        expect_cluster=self.store.cluster or None,
                        timeout=5.0,
                    )
                    advertise = self.config.advertise or self._default_advertise(host, port)
                    self.link = CoordinatorLink(
                        peer, self.store, advertise, heartbeat=self.config.heartbeat,
                        service=self.service, stats=self.metrics.rpc.totals,
                    )
                    nursery.start_soon(self.link.run)
                nursery.start_soon(self._maintenance)
                if self.compactor.supported:
                    nursery.start_soon(self._space)
                self.scrubber = Scrubber(self.store, self.config.scrub_rate * 1e6,
                                         self.config.scrub_interval,
                                         self.link.report_corrupt if self.link else None)
                nursery.start_soon(self.scrubber.run)
                log.info("node listening on %s (data %s)", self.address, self.config.data)
                task_status.started(self.address)
        finally:
            with trio.CancelScope(shield=True):
                if peer is not None:
                    await peer.aclose()
                if self.service.peers is not None:
                    await self.service.peers.aclose()

    def _cluster(self) -> str:
        return self.store.cluster

    async def _maintenance(self) -> None:
        ask = self.link.outcome if self.link else None
        while True:
            await self.service.maintain(ask)
            await trio.sleep(self.config.tick)

    async def _space(self) -> None:
        """Measure live and on-disk bytes (heartbeats carry them); compact when worth it."""
        while True:
            await trio.sleep(self.config.space_interval)
            try:
                await self.compactor.measure()
            except (lmdb.Error, OSError) as e:  # advisory figures: the next round retries
                log.warning("measuring the store's space failed: %s", e)
                continue
            running = self.compactor.current is not None and self.compactor.current.running
            if not running and self.compactor.worth_it():
                log.info("dead space: %d bytes on disk for %d in use; compacting",
                         self.compactor.on_disk, self.store.used())
                self.compactor.start()

    def _default_advertise(self, host: str, port: int) -> str:
        if host in ("0.0.0.0", "::", ""):
            name = socket.gethostname()
            log.warning(
                "listening on all interfaces; advertising %s:%d (set --advertise)", name, port
            )
            return join_address(name, port)
        return join_address(host, port)
