"""Figures of `dfs stats` from the coordinator's `stats` samples: rates between two samples,
and percentiles from histogram buckets (as Prometheus' histogram_quantile estimates them).

Pure functions over the samples' JSON, so the live view and `--json` agree and tests need
no cluster."""

from __future__ import annotations

from typing import Any

Buckets = list[list[Any]]  # [[upper bound (float, or "+Inf"), cumulative count], ...]


def bound(le: Any) -> float:
    return float("inf") if le == "+Inf" else float(le)


def quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile (0..1) of cumulative `buckets`, linearly interpolated inside the bucket
    it falls in; None with no observation. In the +Inf bucket: the largest finite bound."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for le, count in buckets:
        upper = bound(le)
        if count >= rank:
            if upper == float("inf"):
                return lower
            inside = count - below
            if inside <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / inside
        lower, below = upper, count
    return lower


def bucket_delta(new: Buckets, old: Buckets | None) -> Buckets:
    """The buckets of the observations between two samples (the same bounds in both)."""
    if not old or len(old) != len(new):
        return new
    pairs = zip(new, old, strict=True)
    return [[le, max(0, count - old_count)] for (le, count), (_, old_count) in pairs]


def latency_ms(buckets: Buckets) -> dict[str, float | None]:
    """p50 and p99 in milliseconds, rounded for display."""
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        value = quantile(buckets, q)
        out[name] = None if value is None else round(value * 1000, 3)
    return out


def _rate(new: float, old: float, seconds: float) -> float:
    return max(0.0, new - old) / seconds if seconds > 0 else 0.0


def node_rates(new: dict[str, Any], old: dict[str, Any] | None, now: float,
               then: float) -> dict[str, float]:
    """One node's ops/s, errors/s and bytes/s in and out, from the counters its heartbeats
    carried: timed by when each was heard, not when the coordinator was asked."""
    if old is None:
        return {"ops_per_s": 0.0, "errors_per_s": 0.0, "in_bytes_per_s": 0.0,
                "out_bytes_per_s": 0.0}
    t_new = now - (new.get("stats_age_s") or 0.0)
    t_old = then - (old.get("stats_age_s") or 0.0)
    dt = t_new - t_old
    return {
        "ops_per_s": _rate(new.get("requests", 0), old.get("requests", 0), dt),
        "errors_per_s": _rate(new.get("errors", 0), old.get("errors", 0), dt),
        "in_bytes_per_s": _rate(new.get("bytes_in", 0), old.get("bytes_in", 0), dt),
        "out_bytes_per_s": _rate(new.get("bytes_out", 0), old.get("bytes_out", 0), dt),
    }


def cluster_rates(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Everything the live view shows for the interval between samples `old` and `new`."""
    now, then = new["time_s"], old["time_s"]
    dt = now - then
    aborts_new = sum(new.get("aborts", {}).values())
    aborts_old = sum(old.get("aborts", {}).values())
    old_nodes = {n["id"]: n for n in old.get("nodes", [])}
    nodes = []
    for node in new.get("nodes", []):
        nodes.append({**node, **node_rates(node, old_nodes.get(node["id"]), now, then)})
    lat_new = new.get("commit_latency", {}).get("buckets", [])
    lat_old = old.get("commit_latency", {}).get("buckets", [])
    return {
        "interval_s": dt,
        "commits_per_s": _rate(new.get("commits", 0), old.get("commits", 0), dt),
        "aborts_per_s": _rate(aborts_new, aborts_old, dt),
        "commit_bytes_per_s": _rate(new.get("committed_bytes", 0),
                                    old.get("committed_bytes", 0), dt),
        "coordinator_ops_per_s": _rate(new.get("rpc", {}).get("requests", 0),
                                       old.get("rpc", {}).get("requests", 0), dt),
        "in_bytes_per_s": sum(n["in_bytes_per_s"] for n in nodes),
        "out_bytes_per_s": sum(n["out_bytes_per_s"] for n in nodes),
        "ops_per_s": sum(n["ops_per_s"] for n in nodes),
        **latency_ms(bucket_delta(lat_new, lat_old)),
        "nodes": nodes,
    }
