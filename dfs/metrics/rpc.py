"""Server-side RPC metrics: one `observe` per answered request, from the one hook in
`dfs.rpc._answer`.

Cheap by construction: the labelled children of an op are looked up once and cached, so a
request costs a dict lookup, three counter increments and a histogram observation. Labels are
bounded: an op the service does not have is counted as "other" (a client cannot mint labels),
an error's code is one of `dfs.errors.Code`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

#: Seconds; from a cached read (sub-ms) to a slow commit over a loaded disk.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
OTHER = "other"  # the op label of a request for an op the service does not have


def service_ops(service: object) -> list[str]:
    """The ops a Service (instance or class) answers: its `op_*` methods."""
    return sorted(name[3:] for name in dir(service) if name.startswith("op_"))


class _Op:
    __slots__ = ("latency", "name", "received", "requests", "sent")

    def __init__(self, metrics: RpcMetrics, name: str) -> None:
        self.name = name
        self.requests = metrics.requests_total.labels(name)
        self.latency = metrics.duration.labels(name)
        self.received = metrics.received_bytes.labels(name)
        self.sent = metrics.sent_bytes.labels(name)


class RpcMetrics:
    """Counts, errors, latency and bytes of the requests one process serves, per op.

    The plain totals (`requests`, `errors`, `bytes_in`, `bytes_out`) are what a node reports in
    its heartbeats for `dfs stats`."""

    def __init__(self, registry: CollectorRegistry, ops: Iterable[str]) -> None:
        self.requests_total = Counter(
            "dfs_rpc_requests", "Requests served, by op", ["op"], registry=registry)
        self.errors_total = Counter(
            "dfs_rpc_errors", "Requests answered with an error, by op and error code",
            ["op", "code"], registry=registry)
        self.duration = Histogram(
            "dfs_rpc_request_duration_seconds", "Time from a request's arrival to its reply",
            ["op"], buckets=LATENCY_BUCKETS, registry=registry)
        self.received_bytes = Counter(
            "dfs_rpc_request_bytes", "Bytes of request frames received, by op", ["op"],
            registry=registry)
        self.sent_bytes = Counter(
            "dfs_rpc_reply_data_bytes", "Bytes of data fields (chunks, digests) in replies, "
            "by op", ["op"], registry=registry)
        self._known = frozenset(ops)
        self._ops: dict[str, _Op] = {}
        self._other = _Op(self, OTHER)
        self._errors: dict[tuple[str, str], Any] = {}
        self.requests = 0
        self.errors = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def observe(self, op: object, received: int, reply: dict[str, Any], seconds: float) -> None:
        """One answered request: `received` bytes of its frame, its reply, how long it took."""
        entry = self._ops.get(op) if isinstance(op, str) else None
        if entry is None:
            entry = self._entry(op)
        entry.requests.inc()
        entry.latency.observe(seconds)
        entry.received.inc(received)
        self.requests += 1
        self.bytes_in += received
        sent = 0
        for value in reply.values():
            if isinstance(value, (bytes, bytearray, memoryview)):
                sent += len(value)
        if sent:
            entry.sent.inc(sent)
            self.bytes_out += sent
        if not reply.get("ok"):
            self._error(entry.name, str(reply.get("error")))

    def _entry(self, op: object) -> _Op:
        if not isinstance(op, str) or op not in self._known:
            return self._other
        entry = self._ops[op] = _Op(self, op)
        return entry

    def _error(self, op: str, code: str) -> None:
        self.errors += 1
        key = (op, code)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.errors_total.labels(op, code)
        child.inc()

    def totals(self) -> dict[str, int]:
        """The plain totals, as heartbeats and the `stats` op carry them."""
        return {"requests": self.requests, "errors": self.errors,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
