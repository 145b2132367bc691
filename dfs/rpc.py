"""Request/reply over frames: the authenticated handshake, the server loop, client peers.

Handshake (docs/design.md §4), both sides proving the cluster secret with HMAC-SHA256:
  client -> {"op": "hello", "proto": 2, "nonce": Nc}
  server <- {"ok": true, "proto": 2, "cluster": C, "nonce": Ns, "mac": H(K, "srv"|Nc|Ns|C)}
  client -> {"op": "auth", "mac": H(K, "cli"|Ns|Nc|C)}
  server <- {"ok": true}          (or AUTH, and the connection is closed)
With --tls-* (dfs/tls.py) all of it runs inside TLS, both ends' certificates verified. Without
TLS, every later frame carries an HMAC under a per-direction key derived from both nonces and
the secret (`frame_keys`, dfs.wire.FrameMac): a frame altered, replayed, reordered or injected
on the path ends the connection. With TLS there is no frame MAC: TLS's records already
authenticate, number and encrypt every byte.
After it, a connection carries many requests at once, each reply carrying its request's id:
- the server answers a connection's requests concurrently, at most MAX_INFLIGHT at a time
  (then it stops reading: backpressure), replies sent as they complete (`_serve_requests`);
- a client `Peer` multiplexes its calls over a few connections (`dfs.mux.Connection`: the
  first caller waiting reads replies for all, so there is no background task to give a home).
The simulator swaps the TCP underneath both for its own network (`install_network`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from dfs import tls as tls_
from dfs.errors import Code, DfsError, InDoubt, raise_for_reply
from dfs.mux import Connection
from dfs.tls import TlsConfig
from dfs.wire import (
    ConnectionClosed,
    FrameMac,
    FrameStream,
    FrameTampered,
    FrameTooBig,
    decode,
    encode,
)

log = logging.getLogger(__name__)

PROTO = 2  # 2: frames after the handshake carry a MAC unless the connection is TLS
HANDSHAKE_TIMEOUT = 5.0
_OP = re.compile(r"^[a-z][a-z_]{0,39}$")


def load_secret(path: str | Path | None) -> bytes:
    if path is None:
        raise DfsError(Code.AUTH, "no cluster secret: pass --secret-file or set DFS_SECRET_FILE")
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise DfsError(Code.AUTH, f"cannot read secret file {path}: {e.strerror}") from None
    if len(data) < 32:
        raise DfsError(Code.AUTH, f"secret file {path} holds fewer than 32 bytes")
    return data


def _mac(secret: bytes, label: bytes, a: bytes, b: bytes, cluster: str) -> bytes:
    return hmac.new(secret, label + a + b + cluster.encode(), hashlib.sha256).digest()


def frame_keys(secret: bytes, cnonce: bytes, snonce: bytes, cluster: str) -> tuple[bytes, bytes]:
    """The (client->server, server->client) frame MAC keys of one connection: HKDF (RFC 5869)
    with HMAC-SHA256, both nonces as the salt, the cluster secret as the input key, one
    expand block per direction. Fresh nonces make fresh keys: no frame of another
    connection (nor of the other direction) verifies on this one."""
    prk = hmac.digest(cnonce + snonce, secret, "sha256")
    info = b"dfs frame mac v1|" + cluster.encode() + b"|"
    return (hmac.digest(prk, info + b"c2s\x01", "sha256"),
            hmac.digest(prk, info + b"s2c\x01", "sha256"))


#: A host name or IPv4 address (an IPv6 one goes in brackets: [::1]:7700).
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def parse_address(addr: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port), port 0 to 65535; anything else is EINVAL saying what is
    wrong in one line, never a host name for the resolver to fail on later ("A:1,B:2" is two
    addresses where one is meant: taken whole, getaddrinfo would look up a host "A:1,B")."""
    if "," in addr:
        raise DfsError(Code.EINVAL, f"{addr!r} is a list: one HOST:PORT is meant here")
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ok = ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        ok = _HOST.fullmatch(host) is not None
    if not (sep and ok and port.isascii() and port.isdigit() and int(port) < 65536):
        raise DfsError(Code.EINVAL, f"bad address {addr!r}: want HOST:PORT")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """The HOST:PORT parse_address reads back (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- requests


class Request:
    """A decoded request with typed accessors: a missing or mistyped field is BAD_REQUEST."""

    __slots__ = ("msg", "op", "peer")

    def __init__(self, msg: dict[str, Any], peer: str) -> None:
        self.msg = msg
        self.op = msg.get("op")
        self.peer = peer

    def _get(self, key: str, types: tuple[type, ...], default: Any, required: bool) -> Any:
        if key not in self.msg or self.msg[key] is None:
            if required:
                raise DfsError(Code.BAD_REQUEST, f"{self.op}: missing field {key!r}")
            return default
        value = self.msg[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise DfsError(Code.BAD_REQUEST, f"{self.op}: field {key!r} has the wrong type")
        return value

    def int(self, key: str, default: int | None = None, *, required: bool = True) -> Any:
        value = self._get(key, (int,), default, required and default is None)
        if value is not None and value < 0:
            raise DfsError(Code.BAD_REQUEST, f"{self.op}: field {key!r} must not be negative")
        return value

    def opt_int(self, key: str) -> int | None:
        return self.int(key, required=False)

    def str(self, key: str, default: str | None = None, *, required: bool = True) -> Any:
        return self._get(key, (str,), default, required and default is None)

    def bytes(self, key: str, default: bytes | None = None, *, required: bool = True) -> Any:
        return self._get(key, (bytes,), default, required and default is None)

    def bool(self, key: str, default: bool = False) -> bool:
        return self._get(key, (bool,), default, False)

    def list(self, key: str, default: list | None = None, *, required: bool = True) -> Any:
        return self._get(key, (list,), default, required and default is None)

    def dict(self, key: str, default: dict | None = None, *, required: bool = True) -> Any:
        return self._get(key, (dict,), default, required and default is None)

    def name(self, key: str = "name") -> bytes:
        """A directory entry name (docs/design.md §3): 1-255 bytes, no '/', no NUL, not . or .."""
        value = self._get(key, (bytes, str), None, True)
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if len(raw) > 255:
            raise DfsError(Code.ENAMETOOLONG, f"name of {len(raw)} bytes (limit 255)")
        if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b".."):
            raise DfsError(Code.EINVAL, f"invalid name {raw!r}")
        return raw


Handler = Callable[[Request], Awaitable[dict[str, Any] | None]]


class RpcObserver(Protocol):
    """Told of every request a server answered (dfs.metrics.RpcMetrics)."""

    def observe(self, op: object, received: int, reply: dict[str, Any],
                seconds: float) -> None: ...


class Service:
    """Base of a server's request handlers: op "x" is served by method `op_x`."""

    rpc_metrics: RpcObserver | None = None  # set by a process that keeps metrics

    async def dispatch(self, req: Request) -> dict[str, Any] | None:
        op = req.op
        if not isinstance(op, str) or not _OP.match(op):
            raise DfsError(Code.BAD_REQUEST, "missing or malformed op")
        method = getattr(self, "op_" + op, None)
        if method is None:
            raise DfsError(Code.BAD_REQUEST, f"unknown op {op!r}")
        return await method(req)


# ---------------------------------------------------------------- server


MAX_INFLIGHT = 64  # requests of one connection served at once; past it the server stops reading


async def serve_connection(
    stream: trio.abc.Stream,
    service: Service,
    secret: bytes,
    cluster: Callable[[], str],
    peer: str = "?",
    *,
    max_inflight: int | None = None,
    tls: TlsConfig | None = None,
) -> None:
    """Authenticate one connection (TLS first, with `tls`), then answer its requests, many at
    once, until it closes."""
    frames = FrameStream(stream)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            if tls is not None:
                secured = await tls_.accept(stream, tls, peer)
                if secured is None:
                    return
                frames = FrameStream(secured)
            if not await _server_handshake(frames, secret, cluster(),
                                          frame_mac=tls is None):
                return
        await _serve_requests(frames, service, peer, max_inflight or MAX_INFLIGHT)
    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except trio.TooSlowError:
        log.info("handshake from %s timed out", peer)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await frames.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


async def _serve_requests(frames: FrameStream, service: Service, peer: str, limit: int) -> None:
    """Read requests and answer each in its own task, at most `limit` at once: when that many
    are being served the loop stops reading (TCP then pushes back on the client) until one ends.

    Error policy: a handler's exception is its request's error reply (`_answer`); a reply that
    cannot be sent (the client went away) is dropped. Reading stops at EOF, a broken stream or
    a frame over the limit (answered TOO_BIG), and the requests already read still run to their
    end, as they did when a connection served one at a time, before the connection is closed.
    Only a bug in this loop itself escapes, cancelling the connection's handlers with it."""
    slots = trio.Semaphore(limit)
    async with trio.open_nursery() as handlers:
        while True:
            await slots.acquire()
            try:
                body = await frames.receive_body()
            except FrameTooBig as e:
                await _send_reply(frames, {"id": None, **e.to_reply()})
                return
            except FrameTampered as e:
                log.warning("connection from %s closed: %s", peer, e)
                return
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError):
                return
            handlers.start_soon(_serve_one, frames, body, service, peer, slots)


async def _serve_one(frames: FrameStream, body: bytes, service: Service, peer: str,
                     slots: trio.Semaphore) -> None:
    try:
        reply = await _answer(body, service, peer)
        if reply is None:  # InDoubt: no answer is the true one; the client sees a lost reply
            await frames.aclose()
            return
        await _send_reply(frames, reply)
    finally:
        slots.release()


async def _send_reply(frames: FrameStream, reply: dict[str, Any]) -> None:
    try:
        data = encode(reply)
    except Exception:  # a handler returned something msgpack cannot carry: a bug, not the wire's
        log.exception("unencodable reply to request id %r", reply.get("id"))
        data = encode({"id": reply.get("id"),
                       **DfsError(Code.INTERNAL, "internal error (see the server's log)")
                       .to_reply()})
    try:
        await frames.send_frame(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client is gone; its other replies meet the same


async def _answer(body: bytes | bytearray, service: Service, peer: str
                  ) -> dict[str, Any] | None:
    rid = op = None
    started = time.perf_counter()
    try:
        msg = decode(body)
        rid, op = msg.get("id"), msg.get("op")
        if not isinstance(rid, int) or isinstance(rid, bool):
            rid = None
        result = await service.dispatch(Request(msg, peer))
        reply = {"ok": True}
        if result:
            reply.update(result)
    except InDoubt as e:
        log.warning("request %r from %s left unanswered: %s", op, peer, e.msg)
        return None
    except DfsError as e:
        reply = e.to_reply()
    except Exception:
        log.exception("internal error serving a request from %s", peer)
        reply = DfsError(Code.INTERNAL, "internal error (see the server's log)").to_reply()
    if service.rpc_metrics is not None:  # dfs.metrics.RpcMetrics: counts, errors, latency
        service.rpc_metrics.observe(op, len(body), reply, time.perf_counter() - started)
    reply["id"] = rid
    return reply


async def _server_handshake(frames: FrameStream, secret: bytes, cluster: str, *,
                            frame_mac: bool) -> bool:
    try:
        hello = await frames.receive()
    except DfsError as e:
        await frames.send(e.to_reply())
        return False
    if hello.get("op") != "hello" or not isinstance(hello.get("nonce"), bytes):
        await frames.send(DfsError(Code.BAD_REQUEST, "expected hello").to_reply())
        return False
    if hello.get("proto") != PROTO:
        await frames.send(
            DfsError(Code.BAD_REQUEST, f"protocol {hello.get('proto')!r}, want {PROTO}").to_reply()
        )
        return False
    nonce = os.urandom(16)
    mac = _mac(secret, b"srv", hello["nonce"], nonce, cluster)
    await frames.send({"ok": True, "proto": PROTO, "cluster": cluster, "nonce": nonce, "mac": mac})
    try:
        auth = await frames.receive()
    except DfsError as e:
        await frames.send(e.to_reply())
        return False
    want = _mac(secret, b"cli", nonce, hello["nonce"], cluster)
    got = auth.get("mac")
    if auth.get("op") != "auth" or not isinstance(got, bytes) or not hmac.compare_digest(got, want):
        await frames.send(DfsError(Code.AUTH, "authentication failed").to_reply())
        return False
    await frames.send({"ok": True})
    if frame_mac:
        to_server, to_client = frame_keys(secret, hello["nonce"], nonce, cluster)
        frames.start_mac(FrameMac(send_key=to_client, receive_key=to_server))
    return True


async def serve(
    service: Service,
    host: str,
    port: int,
    secret: bytes,
    cluster: Callable[[], str],
    *,
    tls: TlsConfig | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve forever; task_status.started() gets the listeners (to learn an OS-picked port).
    `tls` None: the process's TLS settings (`dfs.tls.install`), plain TCP when it has none."""
    tls = tls or tls_.current()
    if tls is not None and not tls.can_serve:
        raise DfsError(Code.EINVAL, "serving TLS needs --tls-cert and --tls-key")

    async def handle(stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            name = f"{host}:{port}"
        except OSError:
            name = "?"
        await serve_connection(stream, service, secret, cluster, name, tls=tls)

    if _network is not None:
        await _network.serve(service, host, port, task_status=task_status)
        return
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)


# ---------------------------------------------------------------- network


class Network(Protocol):
    """Where requests travel when not over TCP: the simulator's in-process network
    (dfs/sim/network.py). It carries the same request and reply maps a frame would, to the
    same `Service.dispatch`, with its own seeded loss, delay, duplication and partitions."""

    async def serve(self, service: Service, host: str, port: int, *,
                    task_status: trio.TaskStatus[Any]) -> None: ...

    async def call(self, address: str, op: str, fields: dict[str, Any],
                   timeout: float) -> dict[str, Any]: ...


_network: Network | None = None


def install_network(network: Network | None) -> Network | None:
    """Route every `serve` and `Peer.call` of this process through `network` (None: TCP)."""
    global _network
    previous, _network = _network, network
    return previous


# ---------------------------------------------------------------- client


class Backoff:
    """The pauses between the attempts of a request retried until a deadline: doubling from
    `first_s` to `max_s`, the last one cut short to end AT the deadline, so that one more
    attempt is made there. A caller told to retry for S seconds then retries for S seconds,
    not S less the pause it would have overshot by (--retry-for, docs/client.md)."""

    def __init__(self, first_s: float = 0.05, max_s: float = 1.0) -> None:
        self.delay_s = first_s
        self.max_s = max_s

    async def wait(self, deadline: float) -> bool:
        """Pause before the next attempt: False, at once, when the deadline has passed."""
        left_s = deadline - trio.current_time()
        if left_s <= 0:
            return False
        await trio.sleep(min(self.delay_s, left_s))
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return True


async def connect(
    address: str, secret: bytes, expect_cluster: str | None = None, timeout: float = 5.0,
    *, tls: TlsConfig | None = None,
) -> Connection:
    """A handshaken connection; `tls` None: the process's TLS settings (plain without any).
    A TLS failure is one line: AUTH when a certificate is refused (either way)."""
    tls = tls or tls_.current()
    host, port = parse_address(address)
    with trio.fail_after(timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if tls is not None:
            stream = tls_.wrap_client(stream, tls, host)
        frames = FrameStream(stream)
        try:
            nonce = os.urandom(16)
            await frames.send({"op": "hello", "proto": PROTO, "nonce": nonce})
            hello = raise_for_reply(await frames.receive())
            cluster = hello.get("cluster")
            snonce = hello.get("nonce")
            if not isinstance(cluster, str) or not isinstance(snonce, bytes):
                raise DfsError(Code.BAD_REQUEST, "malformed handshake from server")
            if not hmac.compare_digest(
                _mac(secret, b"srv", nonce, snonce, cluster), hello.get("mac") or b""
            ):
                raise DfsError(Code.AUTH, f"{address} does not know the cluster secret")
            if expect_cluster and cluster and cluster != expect_cluster:
                raise DfsError(Code.AUTH, f"{address} belongs to cluster {cluster}")
            await frames.send({"op": "auth", "mac": _mac(secret, b"cli", snonce, nonce, cluster)})
            raise_for_reply(await frames.receive())
            if tls is None:
                to_server, to_client = frame_keys(secret, nonce, snonce, cluster)
                frames.start_mac(FrameMac(send_key=to_server, receive_key=to_client))
        except BaseException as e:
            await Connection(frames, "").aclose()
            refused = tls_.refusal(e, address) if tls is not None else None
            if refused is not None:
                raise refused from None
            raise
    return Connection(frames, cluster)


_NETWORK_ERRORS = (
    OSError,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


class PeerUnavailable(DfsError):
    """UNAVAILABLE raised on this side: the request may or may not have reached the peer.

    An error *reply* with code UNAVAILABLE is a plain DfsError; callers of a non-idempotent
    request (a commit) need to tell the two apart to know whether to ask for the outcome.
    """

    def __init__(self, msg: str) -> None:
        super().__init__(Code.UNAVAILABLE, msg)


class NotSent(PeerUnavailable):
    """PeerUnavailable before the request went out (no connection could be opened): the peer
    cannot have acted on it, so even a non-idempotent request may be sent elsewhere."""


MAX_CONNECTIONS = 4  # connections per peer; calls share them (one is enough for small calls)
BULK_BYTES = 64 * 1024  # a request carrying more payload than this is bulk: kept off the
#                         connection small calls use, so they do not queue behind its frames


def _payload(fields: dict[str, Any]) -> int:
    return sum(len(v) for v in fields.values() if isinstance(v, (bytes, bytearray, memoryview)))


class Peer:
    """Calls to one address, multiplexed over at most `max_connections` connections.

    Small calls share the least loaded connection with no bulk request in flight; bulk calls
    (a payload over BULK_BYTES: chunk writes) share theirs; a connection is opened only when
    none fits, and at most MAX_INFLIGHT calls ride one connection (the server's limit), so at
    most max_connections * MAX_INFLIGHT calls are in flight to a peer and the rest wait."""

    def __init__(
        self,
        address: str,
        secret: bytes,
        *,
        expect_cluster: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = 10.0,
        tls: TlsConfig | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self.secret = secret
        self.expect_cluster = expect_cluster
        self.timeout = timeout
        self.max_connections = max_connections
        self._conns: list[Connection] = []
        self._slots = trio.Semaphore(max_connections * MAX_INFLIGHT)
        self._connecting = trio.Lock()  # one handshake at a time: a burst shares what it opens
        self.cluster: str | None = None
        self.connections_opened = 0

    async def call(
        self,
        op: str,
        *,
        timeout: float | None = None,
        retry_for: float = 0.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one request; raise DfsError for an error reply.

        A network failure or timeout is UNAVAILABLE. With retry_for > 0 (idempotent requests
        only) network failures are retried with backoff for that many seconds, the last
        attempt at the deadline (Backoff).
        """
        deadline = trio.current_time() + retry_for
        backoff = Backoff()
        while True:
            try:
                return raise_for_reply(await self._call_once(op, fields, timeout or self.timeout))
            except DfsError as e:
                if e.code != Code.UNAVAILABLE or not await backoff.wait(deadline):
                    raise

    async def _call_once(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request, its own cancel scope for the timeout: a call that times out leaves the
        connection to the others (its late reply is dropped)."""
        async with self._slots:
            if _network is not None:
                return await _network.call(self.address, op, fields, timeout)
            bulk = _payload(fields) > BULK_BYTES
            conn: Connection | None = None
            try:
                with trio.fail_after(timeout):
                    conn = await self._pick(bulk)
                    return await self._exchange(conn, op, fields, bulk)
            except trio.TooSlowError:
                error = PeerUnavailable if conn is not None else NotSent
                raise error(f"{self.address}: no reply in {timeout:g} s") from None

    async def _exchange(self, conn: Connection, op: str, fields: dict[str, Any],
                        bulk: bool) -> dict[str, Any]:
        """Once a request has gone out, a broken connection is PeerUnavailable: the request
        may have reached the peer, and it is not resent here."""
        try:
            return await conn.call(op, fields, bulk=bulk)
        except _NETWORK_ERRORS as e:
            self._forget(conn)
            raise PeerUnavailable(f"{self.address}: {type(e).__name__} {e}".strip()) from None

    async def _pick(self, bulk: bool) -> Connection:
        """The connection for a call: a fitting open one, else a new one (up to the limit),
        else the least loaded. An idle connection the peer closed (it restarted) is dropped
        here, before a request goes out on it."""
        conn = await self._fitting(bulk)
        if conn is not None:
            return conn
        async with self._connecting:
            conn = await self._fitting(bulk)  # opened while we waited for the lock?
            if conn is not None:
                return conn
            if len(self._conns) >= self.max_connections:
                return min(self._conns, key=lambda c: c.inflight)
            try:
                conn = await connect(self.address, self.secret, self.expect_cluster,
                                     tls=self.tls)
            except _NETWORK_ERRORS as e:
                raise NotSent(
                    f"{self.address}: {type(e).__name__} {e}".strip()) from None
            self.cluster = conn.cluster
            self.connections_opened += 1
            self._conns.append(conn)
            return conn

    async def _fitting(self, bulk: bool) -> Connection | None:
        for conn in [c for c in self._conns if not c.usable or c.closed_by_peer()]:
            self._forget(conn)
            if not conn.inflight:  # else the last call out closes it
                await conn.aclose()
        room = [c for c in self._conns if c.inflight < MAX_INFLIGHT]
        if bulk:
            lane = [c for c in room if c.bulk] or [c for c in room if not c.inflight]
        else:
            lane = [c for c in room if not c.bulk]
        return min(lane, key=lambda c: c.inflight) if lane else None

    def _forget(self, conn: Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)

    async def aclose(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            await conn.aclose()


class Peers:
    """Pools for every address a process talks to."""

    def __init__(self, secret: bytes, **peer_options: Any) -> None:
        self.secret = secret
        self.options = peer_options
        self._peers: dict[str, Peer] = {}

    def __getitem__(self, address: str) -> Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(address, self.secret, **self.options)
        return peer

    async def aclose(self) -> None:
        for peer in self._peers.values():
            await peer.aclose()
