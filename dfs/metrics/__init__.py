"""Prometheus metrics of every dfs process (docs/operations.md, "Metrics").

Each process keeps its own `prometheus_client.CollectorRegistry` (never the library's global
one), so the simulator's many processes in one interpreter, and tests, stay apart. Counters and
histograms are updated where things happen (the RPC dispatch hook in dfs/rpc.py, the commit
driver, the FUSE handler wrapper); gauges that describe state (queue depths, 2PC phases, space)
are computed at scrape time by custom collectors, so nothing is kept up to date in between.
With `--metrics HOST:PORT` the registry is served over HTTP by a trio task in the process's own
nursery (`dfs.metrics.http`): it dies with the process, and the collectors run on the trio
thread, where reading the server's state is safe.
"""

from __future__ import annotations

from dfs.metrics.http import (
    add_metrics_argument,
    bind_metrics,
    serve_metrics,
    serve_metrics_on,
    start_metrics,
)
from dfs.metrics.rpc import LATENCY_BUCKETS, RpcMetrics

__all__ = ["LATENCY_BUCKETS", "RpcMetrics", "add_metrics_argument", "bind_metrics",
           "serve_metrics", "serve_metrics_on", "start_metrics"]
