"""A TCP proxy on loopback that the nemesis can cut, slow down and heal.

Processes of a nemesis cluster never talk to each other directly: a node advertises a proxy
port that forwards to its real port, and every process reaches the coordinator through a proxy
of its own. Cutting a proxy is then a network partition of exactly the links it carries,
without root, iptables or network namespaces.

Two ways to cut, because real partitions come in both flavours and the software must survive
each: `refuse` resets every connection at once and refuses new ones (a crashed host, an ICMP
unreachable: fast errors), `blackhole` keeps connections open but moves no byte until healed
(dropped packets: only timeouts notice). `slow` adds latency to every piece in both directions
without capping throughput (the pieces are stamped on arrival and released `delay` later).

A proxy may also translate the replies it carries (`rewrite`, frame by frame, only frames that
contain `REWRITE_MARK`): standby coordinators name the leader by its real address in their
NOT_LEADER replies, and a client that followed that address would bypass its proxy, so the
nemesis rewrites it into the proxy of the same link to that leader, as a NAT would. Frames
after the handshake carry a MAC (dfs/wire.py): a rewriting proxy holds the cluster secret,
learns the connection's nonces from the handshake it forwards, and re-seals what it rewrote,
as only a trusted NAT could.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from dfs.rpc import frame_keys, parse_address
from dfs.wire import MAX_FRAME, TAG_BYTES, FrameMac

log = logging.getLogger(__name__)

OK = "ok"
REFUSE = "refuse"
BLACKHOLE = "blackhole"
PIECE = 64 * 1024
IN_FLIGHT = 256  # pieces buffered per direction before the reader stops (backpressure)
CONNECT_TIMEOUT = 5.0
REWRITE_MARK = b"NOT_LEADER"  # only frames holding this are decoded by a rewriting proxy
_LEN = struct.Struct(">I")

#: Given one decoded reply frame, change it in place (the proxy re-encodes it).
Rewrite = Callable[[dict[str, Any]], None]


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0
    reset: int = 0
    bytes: int = 0
    cuts: dict[str, int] = field(default_factory=dict)


class Proxy:
    """Forwards 127.0.0.1:port (0 = the OS picks) to `target`; only loopback is allowed."""

    def __init__(self, name: str, target: str, port: int = 0, rewrite: Rewrite | None = None,
                 secret: bytes = b"") -> None:
        self.name = name
        self.rewrite = rewrite  # applied to frames from the target back to the client
        self.secret = secret  # to re-seal the frames it rewrites
        self.target = target
        self.port = port
        self.mode = OK
        self.delay = 0.0
        self.stats = ProxyStats()
        self._changed = trio.Event()
        self._scopes: set[trio.CancelScope] = set()
        _check_loopback(target)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------ control (from any task)

    def cut(self, mode: str = REFUSE) -> None:
        """Partition: `refuse` (reset connections, refuse new ones) or `blackhole` (stall)."""
        if mode not in (REFUSE, BLACKHOLE):
            raise ValueError(f"bad cut mode {mode!r}")
        self.stats.cuts[mode] = self.stats.cuts.get(mode, 0) + 1
        self._set(mode, self.delay)
        if mode == REFUSE:
            for scope in list(self._scopes):
                scope.cancel()

    def slow(self, delay: float) -> None:
        """Add `delay` seconds of latency to each direction of every connection."""
        self._set(self.mode, max(0.0, delay))

    def heal(self) -> None:
        self._set(OK, 0.0)

    def retarget(self, target: str) -> None:
        """Forward new connections elsewhere (a process restarted on another port)."""
        _check_loopback(target)
        self.target = target

    def _set(self, mode: str, delay: float) -> None:
        if (mode, delay) != (self.mode, self.delay):
            log.info("proxy %s: %s%s", self.name, mode, f" +{delay * 1000:.0f}ms" if delay else "")
        self.mode, self.delay = mode, delay
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_flowing(self) -> None:
        while self.mode == BLACKHOLE:
            await self._changed.wait()

    # ------------------------------------------------------------ serving

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; task_status.started() gets the address listened on."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.stats.connections += 1
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.mode == REFUSE:
                    self.stats.refused += 1
                    return
                await self._wait_flowing()
                if self.mode == REFUSE:
                    self.stats.refused += 1
                    return
                host, port = parse_address(self.target)
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        upstream = await trio.open_tcp_stream(host, port)
                except (OSError, trio.TooSlowError):
                    return  # the target is down: the client sees the connection close
                replies = _Frames(self.rewrite, self.secret) if self.rewrite else None
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope,
                                       replies and replies.hello)
                    nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope,
                                       replies and replies.feed)
            finally:
                self._scopes.discard(scope)
                with trio.CancelScope(shield=True):
                    await downstream.aclose()
        if scope.cancelled_caught:
            self.stats.reset += 1

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope,
        translate: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """One direction: pieces are read at once, stamped, and sent when due and flowing.

        Either side closing (or failing) ends the whole connection: the RPC protocol has one
        request in flight per connection, so a half-open connection is of no use to anyone.
        """
        send, receive = trio.open_memory_channel[tuple[float, bytes]](IN_FLIGHT)

        async def read() -> None:
            async with send:
                while True:
                    data = await source.receive_some(PIECE)
                    if not data:
                        return
                    if translate is not None:
                        data = translate(data)
                        if not data:
                            continue
                    await send.send((trio.current_time(), data))

        async def write() -> None:
            async with receive:
                async for stamp, data in receive:
                    if self.delay:
                        await trio.sleep_until(stamp + self.delay)
                    await self._wait_flowing()
                    await sink.send_all(data)
                    self.stats.bytes += len(data)
            both.cancel()  # the source closed and everything it sent is delivered

        async def guarded(fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                both.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, read)
            nursery.start_soon(guarded, write)


HANDSHAKE_REPLIES = 2  # the server's hello and auth replies: sent before frames carry a MAC


class _Frames:
    """Cuts the reply stream of one connection into RPC frames (4-byte length, msgpack body,
    after the handshake a MAC tag) and passes each on, rewritten and re-sealed when it holds
    REWRITE_MARK; bytes of an incomplete frame wait for the rest. `hello` watches the other
    direction for the client's nonce, the half of the MAC keys only the client sends."""

    def __init__(self, rewrite: Rewrite, secret: bytes) -> None:
        self.rewrite = rewrite
        self.secret = secret
        self.buf = bytearray()
        self.cnonce: bytes | None = None
        self.replies = 0
        self.mac: FrameMac | None = None
        self._hello = bytearray()

    def hello(self, data: bytes) -> bytes:
        """Client bytes, passed on untouched; the first frame's nonce is kept."""
        if self.cnonce is None and len(self._hello) < 4096:
            self._hello += data
            if len(self._hello) >= 4:
                (size,) = _LEN.unpack_from(self._hello)
                if len(self._hello) >= 4 + size:
                    nonce = _decode(bytes(self._hello[4:4 + size])).get("nonce")
                    self.cnonce = nonce if isinstance(nonce, bytes) else b""
        return data

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while len(self.buf) >= 4:
            (size,) = _LEN.unpack_from(self.buf)
            if size > MAX_FRAME:  # not our protocol: pass everything through untouched
                out += self.buf
                self.buf.clear()
                break
            tag = TAG_BYTES if self.replies >= HANDSHAKE_REPLIES else 0
            if len(self.buf) < 4 + size + tag:
                break
            frame = bytes(self.buf[:4 + size + tag])
            del self.buf[:4 + size + tag]
            out += self._passed(frame, size, tag)
        return bytes(out)

    def _passed(self, frame: bytes, size: int, tag: int) -> bytes:
        self.replies += 1
        body = frame[4:4 + size]
        if self.replies == 1:  # the hello reply: the server's nonce and the cluster
            hello = _decode(body)
            snonce, cluster = hello.get("nonce"), hello.get("cluster")
            if self.cnonce and isinstance(snonce, bytes) and isinstance(cluster, str):
                to_server, to_client = frame_keys(self.secret, self.cnonce, snonce, cluster)
                self.mac = FrameMac(send_key=to_client, receive_key=to_server)
            return frame
        if not tag:
            return frame
        new = self._rewritten(body) if REWRITE_MARK in body else body
        if new is body or self.mac is None:
            if self.mac is not None:
                self.mac.sent += 1  # its own tag still holds: only the count moves on
            return frame
        header = _LEN.pack(len(new)) + new
        return header + self.mac.seal(header)

    def _rewritten(self, body: bytes) -> bytes:
        msg = _decode(body)
        if not msg:
            return body
        self.rewrite(msg)
        return bytes(msgpack.packb(msg, use_bin_type=True))


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises several types; pass it on as is
        return {}
    return msg if isinstance(msg, dict) else {}


def _check_loopback(address: str) -> None:
    host, _ = parse_address(address)
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the nemesis proxy only forwards on loopback, not to {address}")


class Proxies:
    """Every proxy of a cluster by name, run in one nursery."""

    def __init__(self) -> None:
        self.by_name: dict[str, Proxy] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep(math.inf)

    async def add(self, name: str, target: str, rewrite: Rewrite | None = None,
                  secret: bytes = b"") -> Proxy:
        assert self._nursery is not None, "Proxies.run is not running"
        proxy = self.by_name[name] = Proxy(name, target, rewrite=rewrite, secret=secret)
        await self._nursery.start(proxy.run)
        return proxy

    def __getitem__(self, name: str) -> Proxy:
        return self.by_name[name]

    def heal_all(self) -> None:
        for proxy in self.by_name.values():
            proxy.heal()
