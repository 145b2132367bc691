"""A mount's metrics: the latency and errors of every FUSE op (from the one wrapper every
handler has, fuse_mount/handler.py) and the read cache's hits, misses and size.

A read is a cache hit when the version it reads was verified already and every chunk it
touched was in memory or on the cache disk: nothing went to the cluster for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dfs.metrics.rpc import LATENCY_BUCKETS

if TYPE_CHECKING:
    from fuse_mount.cache import ReadCache


class MountMetrics:
    def __init__(self, cache: ReadCache | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.duration = Histogram(
            "dfs_mount_op_duration_seconds", "Time the mount took to answer a FUSE request, "
            "by op", ["op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors_total = Counter(
            "dfs_mount_op_errors", "FUSE requests answered with an errno, by op", ["op"],
            registry=self.registry)
        self._ops: dict[str, tuple[Any, Any]] = {}  # op -> (its histogram, its error counter)
        if cache is not None:
            self.registry.register(_CacheCollector(cache))
        ProcessCollector(registry=self.registry)
        self.address: str | None = None

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        children = self._ops.get(op)
        if children is None:  # ops are handler names: a fixed, small set
            children = self._ops[op] = (self.duration.labels(op), self.errors_total.labels(op))
        children[0].observe(seconds)
        if not ok:
            children[1].inc()


class _CacheCollector(Collector):
    def __init__(self, cache: ReadCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        cache = self.cache
        hits = CounterMetricFamily("dfs_mount_cache_hits",
                                   "Reads answered from the local cache alone")
        hits.add_metric([], cache.hits)
        yield hits
        misses = CounterMetricFamily("dfs_mount_cache_misses",
                                     "Reads that fetched from the cluster")
        misses.add_metric([], cache.misses)
        yield misses
        total = cache.hits + cache.misses
        ratio = GaugeMetricFamily("dfs_mount_cache_hit_ratio",
                                  "Cache hits over all reads since the mount started "
                                  "(0 before the first read)")
        ratio.add_metric([], cache.hits / total if total else 0.0)
        yield ratio
        for name, help, value in (
            ("dfs_mount_cache_bytes", "Bytes of chunks in the read cache", cache.total),
            ("dfs_mount_cache_capacity_bytes", "The read cache's cap (--cache-size)",
             cache.capacity),
        ):
            gauge = GaugeMetricFamily(name, help)
            gauge.add_metric([], value)
            yield gauge
