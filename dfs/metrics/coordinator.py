"""The coordinator's metrics: commits, aborts by reason, commit latency, and (at scrape time)
the 2PC phases, the GC / repair / re-replication queues and the nodes' space.

One `CoordinatorMetrics` lives as long as the process. With --meta (HA) a process leads for
terms: each term's CoordinatorService `attach`es itself, the counters go on across terms, and
between terms the state gauges are simply absent (a standby has no queues).
The `stats` op (`dfs stats`) is `snapshot()`: these counters plus the per-node figures the
nodes' heartbeats carry (their own RPC totals).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dfs.errors import DfsError
from dfs.metrics.rpc import LATENCY_BUCKETS, RpcMetrics
from dfs.twopc_types import Phase

if TYPE_CHECKING:
    from dfs.coordinator.service import CoordinatorService

#: The heartbeat's `stats` fields a node may report (all counters, ints).
NODE_STAT_FIELDS = ("requests", "errors", "bytes_in", "bytes_out")
CLIENT_ABORT = "client"  # the client gave up (op abort)
EXPIRED = "expired"  # the client went silent past --txn-timeout


def abort_reason(error: DfsError) -> str:
    """The `reason` label of an abort: its error code, lower case (bounded by `Code`)."""
    return error.code.value.lower()


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 ops: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.commits_total = Counter(
            "dfs_commits", "File versions committed (each file of a multi-file transaction "
            "counts)", registry=reg)
        self.committed_bytes = Counter(
            "dfs_committed_bytes", "Bytes of the file versions committed", registry=reg)
        self.aborts_total = Counter(
            "dfs_aborts", "Write transactions aborted, by reason (an error code in lower case, "
            "or client / expired)", ["reason"], registry=reg)
        self.commit_duration = Histogram(
            "dfs_commit_duration_seconds", "From a client's COMMIT to the durable decision "
            "(PREPARE round and forced log write)", buckets=LATENCY_BUCKETS, registry=reg)
        self.rpc = RpcMetrics(reg, ops)
        reg.register(_StateCollector(self))
        ProcessCollector(registry=reg)
        self.service: CoordinatorService | None = None
        self.address: str | None = None  # where --metrics serves, once bound
        self._aborts: dict[str, Any] = {}
        self.commits = 0
        self.bytes = 0
        self.aborts: dict[str, int] = {}
        # node id -> (the counters its last heartbeat reported, when: trio time)
        self.node_stats: dict[int, tuple[dict[str, int], float]] = {}

    # ------------------------------------------------------------ events

    def attach(self, service: CoordinatorService | None) -> None:
        """The service whose state the gauges describe (None: not leading)."""
        self.service = service

    def committed(self, size: int, seconds: float) -> None:
        self.commits += 1
        self.bytes += size
        self.commits_total.inc()
        self.committed_bytes.inc(size)
        self.commit_duration.observe(seconds)

    def aborted(self, reason: str) -> None:
        self.aborts[reason] = self.aborts.get(reason, 0) + 1
        child = self._aborts.get(reason)
        if child is None:
            child = self._aborts[reason] = self.aborts_total.labels(reason)
        child.inc()

    def node_reported(self, node_id: int, stats: dict[str, Any]) -> None:
        """A heartbeat's `stats`: only the known integer counters are kept."""
        clean = {k: v for k in NODE_STAT_FIELDS
                 if isinstance(v := stats.get(k), int) and not isinstance(v, bool) and v >= 0}
        self.node_stats[node_id] = (clean, trio.current_time())

    # ------------------------------------------------------------ `dfs stats`

    def snapshot(self) -> dict[str, Any]:
        """The `stats` op's reply (docs/protocol.md): counters since the process started."""
        buckets: list[list[float]] = []
        count = total = 0.0
        for family in self.commit_duration.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = s.labels["le"]
                    buckets.append([float(le), s.value])
                elif s.name.endswith("_count"):
                    count = s.value
                elif s.name.endswith("_sum"):
                    total = s.value
        now = trio.current_time()
        doc: dict[str, Any] = {
            "time_s": now,
            "commits": self.commits,
            "committed_bytes": self.bytes,
            "aborts": dict(self.aborts),
            "commit_latency": {"buckets": [[le if le != float("inf") else "+Inf", int(c)]
                                           for le, c in buckets],
                               "count": int(count), "sum_s": total},
            "rpc": self.rpc.totals(),
            "nodes": [],
        }
        service = self.service
        if service is None:
            return doc
        doc.update(_queues(service))
        doc["phases"] = _phases(service)
        for node in service.membership.describe():
            stats, at = self.node_stats.get(node["id"], ({}, None))
            node.update({k: stats.get(k, 0) for k in NODE_STAT_FIELDS})
            node["stats_age_s"] = None if at is None else round(now - at, 3)
            doc["nodes"].append(node)
        return doc


def _phases(service: CoordinatorService) -> dict[str, int]:
    counts = {p.value: 0 for p in Phase}
    for _, phase, _, _ in service.driver.protocol.transactions():
        counts[phase.value] += 1
    return counts


def _queues(service: CoordinatorService) -> dict[str, int]:
    store = service.store
    progress = service.rereplicator.progress
    return {
        "gc_queue": store.db.read(store.gc.count),
        "repair_queue": service.repair_worker.pending(),
        "rereplication_queue": sum(p.remaining for p in progress.nodes.values() if not p.clean),
    }


class _StateCollector(Collector):
    """Gauges read from the attached service at scrape time (on the trio thread)."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service = self.metrics.service
        leader = GaugeMetricFamily("dfs_coordinator_leader",
                                   "1 while this coordinator leads (serves the cluster)")
        leader.add_metric([], 1 if service is not None else 0)
        yield leader
        if service is None:
            return
        phases = GaugeMetricFamily("dfs_2pc_transactions",
                                   "Write transactions in the 2PC machine, by phase", labels=["phase"])
        for phase, n in _phases(service).items():
            phases.add_metric([phase], n)
        yield phases
        open_txns = GaugeMetricFamily("dfs_open_transactions",
                                      "Transactions begun and not yet decided")
        open_txns.add_metric([], len(service.driver.open))
        yield open_txns
        queues = _queues(service)
        for name, help in (
            ("gc_queue", "Superseded or deleted blobs waiting for garbage collection"),
            ("repair_queue", "Replicas queued for read repair (reported bad or missing)"),
            ("rereplication_queue", "Replicas still to re-make off down, draining or removed "
                                    "nodes (as of the last round)"),
        ):
            gauge = GaugeMetricFamily(f"dfs_{name}_depth", help)
            gauge.add_metric([], queues[name])
            yield gauge
        yield from _node_gauges(service)


def _node_gauges(service: CoordinatorService) -> Iterator[Metric]:
    nodes = service.membership.describe()
    states = GaugeMetricFamily("dfs_cluster_nodes", "Nodes in the node table, by state",
                               labels=["state"])
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    for state, n in sorted(counts.items()):
        states.add_metric([state], n)
    yield states
    used = GaugeMetricFamily("dfs_cluster_node_used_bytes",
                             "Bytes a node holds, as its last heartbeat said", labels=["node"])
    capacity = GaugeMetricFamily("dfs_cluster_node_capacity_bytes",
                                 "Bytes a node may hold, as its last heartbeat said",
                                 labels=["node"])
    for n in nodes:
        if n["state"] == "removed":
            continue
        used.add_metric([str(n["id"])], n["used"])
        capacity.add_metric([str(n["id"])], n["capacity"])
    yield used
    yield capacity
