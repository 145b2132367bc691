"""A small synchronous etcd v3 client over etcd's JSON gateway (`/v3/...` on the client port).

Why not a gRPC client: the Python etcd v3 gRPC clients are asyncio-only and dfs runs on trio.
The gateway speaks JSON over plain HTTP, so `httpx.Client` calls it from worker threads
(`dfs.runtime.in_thread`, or inside the LMDB writer's thread) without an event loop of its own.

Conventions of the gateway: keys and values travel base64; int64 fields come back as strings;
a field at its zero value (false, 0, empty list) is left out of a reply.

Every call has a deadline (`timeout`). A connection that cannot be made is tried on the next
endpoint (the request never left, so any call may go elsewhere); a timeout after the request
was sent is not retried (it may have been applied). Every failure is one `EtcdError`, a
`DfsError` with code UNAVAILABLE (TOO_BIG for etcd's request limits): never a hang, never a
traceback to a user.
"""

from __future__ import annotations

import base64
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from dfs.errors import Code, DfsError

# etcd's defaults (--max-txn-ops 128, --max-request-bytes 1.5 MiB). A request's protobuf
# carries a few bytes of framing per operation on top of keys and values: the margin covers it.
ETCD_MAX_TXN_OPS = 128
MAX_REQUEST_BYTES = 1536 * 1024 - 64 * 1024
OP_OVERHEAD = 32  # bytes budgeted per operation for protobuf framing
DEFAULT_TIMEOUT = 2.0
# gRPC status codes etcd returns in a gateway error body.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14  # etcd: "no leader", "leader changed", "timed out" (an election)
RETRY_PAUSE = 0.1  # between tries of a read while etcd elects a leader
PLAIN_SCHEME = "etcd://"
TLS_SCHEME = "etcds://"  # etcd over TLS, with the process's --tls-* certificate and CA


class EtcdError(DfsError):
    """etcd could not be reached or refused the request; `grpc_code` says which (0: transport)."""

    def __init__(self, msg: str, *, grpc_code: int = 0, code: Code = Code.UNAVAILABLE) -> None:
        self.grpc_code = grpc_code
        super().__init__(code, msg)


class Compacted(EtcdError):
    """The revision asked for was compacted away (a paginated read must start over)."""


class LeaseNotFound(EtcdError):
    """The lease is gone: it expired or was revoked."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that covers every key starting with prefix (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(unb64(kv.get("key")), unb64(kv.get("value")),
                   int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                   int(kv.get("version", 0)), int(kv.get("lease", 0)))


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    count: int
    more: bool
    revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """One member's view (maintenance status): what `dfs status` reports about etcd."""

    endpoint: str
    member_id: int
    leader: int
    raft_term: int
    db_size: int
    db_size_in_use: int
    version: str


# Transaction building blocks: plain dicts in the gateway's JSON shape.

def compare(key: bytes, target: str, result: str = "EQUAL", value: int | bytes = 0) -> dict:
    """A txn compare; target CREATE/MOD/VERSION compare revisions, VALUE compares bytes."""
    field_name = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
                  "VALUE": "value", "LEASE": "lease"}[target]
    wire: str = b64(value) if isinstance(value, bytes) else str(value)
    return {"key": b64(key), "target": target, "result": result, field_name: wire}


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_delete(key: bytes, range_end: bytes | None = None) -> dict:
    body = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_delete_range": body}


def op_range(key: bytes, range_end: bytes | None = None) -> dict:
    body = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_range": body}


class EtcdClient:
    """Synchronous calls to an etcd cluster given as endpoints "host:port" (or http URLs).

    Safe to use from several worker threads at once (httpx.Client is).
    """

    def __init__(self, endpoints: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> None:
        if not endpoints:
            raise DfsError(Code.BAD_REQUEST, "no etcd endpoint given")
        scheme = "https" if tls is not None else "http"
        self.endpoints = [e if "://" in e else f"{scheme}://{e}" for e in endpoints]
        self.timeout = timeout
        self.tls = tls  # verifies etcd's certificate and presents this process's (etcds://)
        self._http = httpx.Client(timeout=timeout, trust_env=False,
                                  verify=tls if tls is not None else True)
        self._lock = threading.Lock()
        self._preferred = 0  # the endpoint that answered last

    @classmethod
    def from_url(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> EtcdClient:
        """`etcd://HOST:PORT[,HOST:PORT...]` (the form `--meta` takes), or `etcds://...`:
        TLS to etcd with this process's `--tls-*` settings (dfs/tls.py): etcd's certificate
        checked against the cluster's CA, this process's certificate presented to etcd
        (run etcd with --client-cert-auth)."""
        tls = None
        if url.startswith(TLS_SCHEME):
            from dfs import tls as dfs_tls

            config = dfs_tls.current()
            if config is None or config.cert is None:
                raise DfsError(Code.EINVAL, f"{TLS_SCHEME}... needs --tls-cert, --tls-key and "
                                            "--tls-ca (the CA that signed etcd's certificate)")
            tls = config.client
        rest = url.removeprefix(TLS_SCHEME).removeprefix(PLAIN_SCHEME)
        return cls([e for e in rest.split(",") if e], timeout=timeout, tls=tls)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], *, timeout: float | None = None,
             endpoint: str | None = None, idempotent: bool = False) -> dict[str, Any]:
        """POST body to one gateway path; the decoded reply, or EtcdError within the timeout.

        An idempotent call (a read, a keepalive) is tried again while etcd has no leader,
        until the deadline; a write is not (it may have been applied: the caller decides).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                return self._call_once(path, body, deadline, endpoint, idempotent)
            except EtcdError as e:
                if (not idempotent or e.grpc_code != GRPC_UNAVAILABLE
                        or time.monotonic() + RETRY_PAUSE >= deadline):
                    raise
            time.sleep(RETRY_PAUSE)

    def _call_once(self, path: str, body: dict[str, Any], deadline: float,
                   endpoint: str | None, idempotent: bool) -> dict[str, Any]:
        """One pass over the endpoints, the last one that answered first.

        A member that accepts but does not answer (paused, partitioned) costs a write its
        whole deadline but is skipped next time; an idempotent call gives each endpoint a
        share of the deadline and moves on.
        """
        with self._lock:
            first = self._preferred
        order = ([endpoint] if endpoint is not None else
                 [self.endpoints[(first + i) % len(self.endpoints)]
                  for i in range(len(self.endpoints))])
        last = "no endpoint tried"
        for n, base in enumerate(order):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if idempotent:
                left /= len(order) - n
            try:
                reply = self._http.post(base + path, json=body, timeout=left)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{base}: cannot connect ({_short(e)})"
                continue  # never sent: the next endpoint may take it
            except httpx.TimeoutException:
                self._avoid(base)
                last = f"{base} did not answer {path} in time"
                if idempotent:
                    continue
                raise EtcdError(f"etcd at {last}") from None
            except httpx.HTTPError as e:
                # A reset or a dropped connection (a dead member behind a proxy or balancer
                # accepts, then closes): skip this endpoint from now on; an idempotent call
                # goes on to the next, a write's outcome is the caller's to settle.
                self._avoid(base)
                last = f"{base} failed on {path}: {_short(e)}"
                if idempotent:
                    continue
                raise EtcdError(f"etcd at {last}") from None
            with self._lock:
                self._preferred = self.endpoints.index(base) if base in self.endpoints else 0
            return _decode(base, path, reply)
        raise EtcdError(f"etcd unreachable: {last}")

    def _avoid(self, base: str) -> None:
        with self._lock:
            if base in self.endpoints and self.endpoints[self._preferred] == base:
                self._preferred = (self._preferred + 1) % len(self.endpoints)

    # -- kv -----------------------------------------------------------------------------------

    def range(self, key: bytes, range_end: bytes | None = None, *, prefix: bool = False,
              limit: int = 0, revision: int = 0, count_only: bool = False,
              keys_only: bool = False, serializable: bool = False) -> RangeResult:
        """Keys in [key, range_end) (prefix=True: every key starting with key), in key order."""
        body: dict[str, Any] = {"key": b64(key)}
        end = prefix_end(key) if prefix else range_end
        if end is not None:
            body["range_end"] = b64(end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if count_only:
            body["count_only"] = True
        if keys_only:
            body["keys_only"] = True
        if serializable:
            body["serializable"] = True
        reply = self.call("/v3/kv/range", body, idempotent=True)
        return RangeResult([KeyValue.from_json(kv) for kv in reply.get("kvs", [])],
                           int(reply.get("count", 0)), bool(reply.get("more", False)),
                           _revision(reply))

    def get(self, key: bytes) -> KeyValue | None:
        kvs = self.range(key).kvs
        return kvs[0] if kvs else None

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Put; the revision it made."""
        return _revision(self.call("/v3/kv/put", op_put(key, value, lease)["request_put"]))

    def delete_range(self, key: bytes, range_end: bytes | None = None, *,
                     prefix: bool = False) -> int:
        """Delete [key, range_end) (or the prefix); how many keys went."""
        end = prefix_end(key) if prefix else range_end
        reply = self.call("/v3/kv/deleterange", op_delete(key, end)["request_delete_range"])
        return int(reply.get("deleted", 0))

    def txn(self, compares: Sequence[dict], success: Sequence[dict],
            failure: Sequence[dict] = (), *, timeout: float | None = None) -> TxnResult:
        """One atomic transaction (build its parts with compare/op_put/op_delete/op_range)."""
        body = {"compare": list(compares), "success": list(success), "failure": list(failure)}
        reply = self.call("/v3/kv/txn", body, timeout=timeout)
        return TxnResult(bool(reply.get("succeeded", False)), _revision(reply),
                         reply.get("responses", []))

    def compact(self, revision: int, *, physical: bool = False) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": physical})

    # -- leases -------------------------------------------------------------------------------

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; (id, granted TTL in seconds: etcd may raise a TTL below its minimum)."""
        reply = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if reply.get("error"):
            raise EtcdError(f"etcd refused a lease: {reply['error']}")
        return int(reply["ID"]), int(reply.get("TTL", ttl))

    def lease_keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew once; the TTL it now has. LeaseNotFound when it expired or was revoked."""
        reply = self.call("/v3/lease/keepalive", {"ID": str(lease)}, timeout=timeout,
                          idempotent=True)
        result = reply.get("result")
        if result is None:
            raise EtcdError(f"etcd gave no keepalive result: {_line(reply)}")
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} has expired", grpc_code=GRPC_NOT_FOUND)
        return ttl

    def lease_revoke(self, lease: int) -> None:
        """Revoke (deleting every key attached to it); a lease already gone is fine."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFound:
            pass

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on the lease; -1 when it is gone."""
        reply = self.call("/v3/lease/timetolive", {"ID": str(lease)}, idempotent=True)
        return int(reply.get("TTL", -1))

    # -- cluster ------------------------------------------------------------------------------

    def status(self, endpoint: str | None = None) -> Status:
        """Maintenance status of one member (default: whichever answers)."""
        scheme = "https" if self.tls is not None else "http"
        base = None if endpoint is None else (endpoint if "://" in endpoint
                                              else f"{scheme}://{endpoint}")
        reply = self.call("/v3/maintenance/status", {}, endpoint=base, idempotent=True)
        return Status(base or "", int(reply.get("header", {}).get("member_id", 0)),
                      int(reply.get("leader", 0)), int(reply.get("raftTerm", 0)),
                      int(reply.get("dbSize", 0)), int(reply.get("dbSizeInUse", 0)),
                      str(reply.get("version", "")))

    def member_list(self) -> list[dict[str, Any]]:
        """Members as {id, name, peer_urls, client_urls}."""
        reply = self.call("/v3/cluster/member/list", {}, idempotent=True)
        return [{"id": int(m.get("ID", 0)), "name": m.get("name", ""),
                 "peer_urls": m.get("peerURLs", []), "client_urls": m.get("clientURLs", [])}
                for m in reply.get("members", [])]

    def alarms(self) -> list[tuple[int, str]]:
        """Raised alarms as (member id, "NOSPACE"/"CORRUPT"); empty when healthy."""
        reply = self.call("/v3/maintenance/alarm", {"action": "GET"}, idempotent=True)
        return [(int(a.get("memberID", 0)), str(a.get("alarm", "")))
                for a in reply.get("alarms", [])]


def _revision(reply: dict[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _short(e: BaseException) -> str:
    return _line(str(e) or type(e).__name__)


def _line(text: object) -> str:
    return " ".join(str(text).split())[:200]


def _decode(base: str, path: str, reply: httpx.Response) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        raise EtcdError(f"etcd at {base} sent HTTP {reply.status_code} without JSON on "
                        f"{path}") from None
    if reply.status_code == 200 and "error" not in body:
        return body
    if isinstance(body.get("error"), dict):  # a streaming call's error ({"error": {...}})
        body = body["error"]
    message = _line(body.get("message") or body.get("error") or f"HTTP {reply.status_code}")
    grpc_code = int(body.get("code", 0) or 0)
    message = message.removeprefix("etcdserver: ")
    if "compacted" in message:
        raise Compacted(f"etcd: {message}", grpc_code=grpc_code)
    if "lease not found" in message:
        raise LeaseNotFound(f"etcd: {message}", grpc_code=grpc_code)
    if "too many operations" in message or "too large" in message:
        raise EtcdError(f"etcd: {message}", grpc_code=grpc_code, code=Code.TOO_BIG)
    raise EtcdError(f"etcd at {base}: {message}", grpc_code=grpc_code)
