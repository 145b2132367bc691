"""A storage node's metrics: its RPCs (the dispatch hook), and at scrape time its space, blob
count and scrub progress, read from the node's objects on the trio thread."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dfs.metrics.rpc import RpcMetrics

if TYPE_CHECKING:
    from storage_node.node import Node


class NodeMetrics:
    def __init__(self, node: Node, ops: Iterable[str],
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rpc = RpcMetrics(self.registry, ops)
        self.registry.register(_NodeCollector(node))
        ProcessCollector(registry=self.registry)
        self.address: str | None = None  # where --metrics serves, once bound


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        store = self.node.store
        used = store.used()
        for name, help, value in (
            ("dfs_node_used_bytes", "Bytes of the node's store in use (blobs, chunks, meta)",
             used),
            ("dfs_node_capacity_bytes", "Bytes the node may hold (--capacity, or used plus "
             "what its filesystem has free)", store.capacity()),
            ("dfs_node_blobs", "Blobs in the node's store, any state", store.count()),
        ):
            gauge = GaugeMetricFamily(name, help)
            gauge.add_metric([], value)
            yield gauge
        registered = GaugeMetricFamily("dfs_node_registered",
                                       "1 once the node is registered with a coordinator")
        link = self.node.link
        registered.add_metric([], 1 if link is not None and link.registered.is_set() else 0)
        yield registered
        scrubber = self.node.scrubber
        if scrubber is None:
            return
        for name, help, value in (
            ("dfs_scrub_passes", "Scrub passes completed over every stored blob",
             scrubber.passes),
            ("dfs_scrub_bytes", "Bytes re-verified by the scrubber", scrubber.scrubbed_bytes),
            ("dfs_scrub_corrupt_blobs", "Blobs the scrubber found corrupt",
             scrubber.corrupt_found),
        ):
            counter = CounterMetricFamily(name, help)
            counter.add_metric([], value)
            yield counter
        unreported = GaugeMetricFamily("dfs_scrub_unreported_blobs",
                                       "Corrupt blobs not yet reported to the coordinator")
        unreported.add_metric([], len(scrubber.unreported))
        yield unreported
