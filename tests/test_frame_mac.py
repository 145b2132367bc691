"""Without TLS, a host on the path cannot alter, replay, reorder or inject a frame (issue 12).

A proxy on loopback between a real client and a real server cuts the byte stream into frames
and tampers with one after the handshake; the connection must end there and the frame must
never be acted on (the service records what it served).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from cluster import Cluster
from etcd_harness import TcpProxy

from dfs import rpc, wire
from dfs.errors import DfsError

SECRET = b"m" * 40
HANDSHAKE_FRAMES = 2  # each way: hello + auth, then its reply
# 0 on code whose frames had no tag: lets these tests run there, to show they fail on it.
TAG = getattr(wire, "TAG_BYTES", 0)
MARK = b"MARKER-0123456789"

#: Given (direction, index of the frame after the handshake, frame bytes): what to send on.
Tamper = Callable[[str, int, bytes], list[bytes]]


class Store(rpc.Service):
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def op_put(self, req: rpc.Request) -> dict:
        self.stored.append(req.bytes("data"))
        return {"n": len(self.stored)}


class FrameProxy:
    """Forwards frames both ways, handing each one after the handshake to `tamper`."""

    def __init__(self, target: str, tamper: Tamper) -> None:
        self.target = target
        self.tamper = tamper
        self.captured = bytearray()

    async def handle(self, client: trio.SocketStream) -> None:
        host, port = rpc.parse_address(self.target)
        async with client, await trio.open_tcp_stream(host, port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, "c2s", client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, "s2c", server, client, nursery.cancel_scope)

    async def _pump(self, direction: str, source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        buf = bytearray()
        seen = 0
        try:
            while data := await source.receive_some(65536):
                self.captured += data
                buf += data
                while len(buf) >= 4:
                    (size,) = struct.unpack_from(">I", buf)
                    whole = 4 + size + (TAG if seen >= HANDSHAKE_FRAMES else 0)
                    if len(buf) < whole:
                        break
                    frame, buf = bytes(buf[:whole]), buf[whole:]
                    out = [frame] if seen < HANDSHAKE_FRAMES else \
                        self.tamper(direction, seen - HANDSHAKE_FRAMES, frame)
                    seen += 1
                    for piece in out:
                        await sink.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()


async def _start(nursery: trio.Nursery, tamper: Tamper) -> tuple[Store, str, str]:
    store = Store()
    listeners = await nursery.start(rpc.serve, store, "127.0.0.1", 0, SECRET, lambda: "c1")
    direct = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    proxy = FrameProxy(direct, tamper)
    plisteners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    return store, direct, f"127.0.0.1:{plisteners[0].socket.getsockname()[1]}"


def _flip_mark(direction: str, index: int, frame: bytes) -> list[bytes]:
    at = frame.find(MARK)
    if direction != "c2s" or at < 0:
        return [frame]
    return [frame[:at] + bytes([frame[at] ^ 0x01]) + frame[at + 1:]]


async def test_a_frame_altered_in_flight_closes_the_connection_and_is_not_served(
        nursery: trio.Nursery) -> None:
    store, direct, proxied = await _start(nursery, _flip_mark)
    peer = rpc.Peer(proxied, SECRET, timeout=3)
    with pytest.raises(DfsError) as e:
        await peer.call("put", data=MARK + os.urandom(100))
    assert e.value.code.value == "UNAVAILABLE"
    assert store.stored == [], "the altered frame was served"
    # The server goes on serving everyone else.
    assert (await rpc.Peer(direct, SECRET).call("put", data=b"fine"))["n"] == 1
    await peer.aclose()


async def test_a_reply_altered_in_flight_fails_the_call_at_the_client(
        nursery: trio.Nursery) -> None:
    def flip_reply(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction != "s2c":
            return [frame]
        return [frame[:6] + bytes([frame[6] ^ 0x40]) + frame[7:]]

    _, _, proxied = await _start(nursery, flip_reply)
    with pytest.raises(DfsError) as e:
        await rpc.Peer(proxied, SECRET, timeout=3).call("put", data=b"x")
    assert e.value.code.value == "UNAVAILABLE"


async def test_a_replayed_frame_closes_the_connection_and_is_served_once(
        nursery: trio.Nursery) -> None:
    def replay(direction: str, index: int, frame: bytes) -> list[bytes]:
        return [frame, frame] if direction == "c2s" and index == 0 else [frame]

    store, _, proxied = await _start(nursery, replay)
    conn = await rpc.connect(proxied, SECRET)
    try:
        with trio.fail_after(5):
            await conn.call("put", {"data": MARK})
            with pytest.raises((wire.ConnectionClosed, trio.BrokenResourceError,
                                trio.ClosedResourceError)):
                while True:  # the server closes the connection at the replayed copy
                    await conn.call("put", {"data": b"after"})
                    await trio.sleep(0.05)
    finally:
        await conn.aclose()
    assert store.stored == [MARK], "the replayed frame was served again"


async def test_reordered_or_injected_frames_close_the_connection_unserved(
        nursery: trio.Nursery) -> None:
    held: list[bytes] = []

    def swap_first_two(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction != "c2s" or index > 1:
            return [frame]
        if index == 0:
            held.append(frame)
            return []
        return [frame, held.pop()]

    store, _, proxied = await _start(nursery, swap_first_two)
    conn = await rpc.connect(proxied, SECRET)
    with trio.move_on_after(3):
        async with trio.open_nursery() as calls:
            for n in range(2):
                calls.start_soon(_put_quietly, conn, b"%d" % n)
    await conn.aclose()
    assert store.stored == []

    def inject(direction: str, index: int, frame: bytes) -> list[bytes]:
        if direction != "c2s" or index != 0:
            return [frame]
        forged = wire.encode({"op": "put", "id": 99, "data": b"forged"}) + os.urandom(TAG)
        return [forged, frame]

    store, _, proxied = await _start(nursery, inject)
    with pytest.raises(DfsError):
        await rpc.Peer(proxied, SECRET, timeout=3).call("put", data=b"real")
    assert store.stored == []


async def _put_quietly(conn: object, data: bytes) -> None:
    try:
        await conn.call("put", {"data": data})  # type: ignore[attr-defined]
    except (wire.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_frame_keys_differ_per_direction_and_per_connection() -> None:
    """What makes a frame of one connection (or one direction) useless on another."""
    a = rpc.frame_keys(SECRET, b"c" * 16, b"s" * 16, "c1")
    b = rpc.frame_keys(SECRET, b"c" * 16, b"t" * 16, "c1")
    assert a[0] != a[1] and set(a).isdisjoint(b)
    assert rpc.frame_keys(b"o" * 40, b"c" * 16, b"s" * 16, "c1")[0] != a[0]


async def test_a_request_sent_before_the_last_handshake_reply_is_checked_not_fatal(
        nursery: trio.Nursery) -> None:
    """A client may pipeline its first request behind `auth`: the bytes the server already
    holds when the MAC starts are checked as tagged frames, and the server keeps serving."""
    store, direct, _ = await _start(nursery, lambda d, i, f: [f])
    host, port = rpc.parse_address(direct)
    frames = wire.FrameStream(await trio.open_tcp_stream(host, port))
    nonce = os.urandom(16)
    await frames.send({"op": "hello", "proto": rpc.PROTO, "nonce": nonce})
    hello = await frames.receive()
    snonce, cluster = hello["nonce"], hello["cluster"]
    to_server, to_client = rpc.frame_keys(SECRET, nonce, snonce, cluster)
    mac = wire.FrameMac(send_key=to_server, receive_key=to_client)
    request = wire.encode({"op": "put", "id": 1, "data": b"early"})
    auth = wire.encode({"op": "auth", "mac": rpc._mac(SECRET, b"cli", snonce, nonce, cluster)})
    await frames.stream.send_all(auth + request + mac.seal(request))  # one write
    assert (await frames.receive())["ok"]  # the auth reply, untagged
    frames.start_mac(mac)
    assert (await frames.receive())["n"] == 1
    await frames.aclose()
    assert store.stored == [b"early"]
    assert (await rpc.Peer(direct, SECRET).call("put", data=b"later"))["n"] == 2


class FlippingProxy(TcpProxy):
    """etcd_harness's loopback proxy, but it flips one bit of the first MARK it carries from
    a client to the node behind it (a frame altered in flight), once."""

    flipped = 0

    def _pump(self, src: socket.socket, dst: socket.socket, way: str,
              last_request: list[bytes]) -> None:
        while not self._stopped.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:  # the end of one side is the end of the other (etcd_harness's
                with contextlib.suppress(OSError):  # keeps it open for held data)
                    dst.shutdown(socket.SHUT_WR)
                return
            at = data.find(MARK) if way == "up" and not self.flipped else -1
            if at >= 0:
                self.flipped += 1
                data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
            with contextlib.suppress(OSError):
                dst.sendall(data)


def test_a_put_altered_on_its_way_to_a_node_changes_no_data(tmp_path: Path) -> None:
    """A real cluster, one node reached through the flipping proxy (its --advertise): the
    put whose chunk was altered fails or is retried whole, the node logs the MAC failure, and
    every read returns the bytes a put sent, never the altered ones."""
    proxy = FlippingProxy("127.0.0.1:1")  # retargeted once the node listens
    cluster = Cluster(tmp_path / "c", nodes=2, replicas=2,
                      extra_args={"node-1": ["--advertise", proxy.endpoint]})
    try:
        cluster.coordinator = cluster._spawn("coordinator", "127.0.0.1:0", None)
        real = cluster._spawn("node-1", "127.0.0.1:0", None)
        host, port = real.rsplit(":", 1)
        proxy.upstream = (host, int(port))
        cluster.add_node("node-2", wait=False)
        cluster.wait_nodes_up()
        v1 = os.urandom(300_000)
        assert cluster.dfs("put", "-", "/f", input=v1).returncode == 0
        v2 = MARK * 20_000
        cluster.dfs("put", "-", "/f", input=v2)  # may fail (UNAVAILABLE) or be retried
        assert proxy.flipped == 1
        assert cluster.dfs("cat", "/f").stdout in (v1, v2)
        cluster.wait_until(lambda: "failed its MAC check" in cluster.log("node-1", 400),
                           timeout=10, message="the node's MAC failure line")
        assert cluster.dfs("check", "--json").returncode == 0
    finally:
        cluster.stop_all()
        proxy.stop()


def test_a_metadata_request_altered_on_its_way_changes_no_name(
        cluster_factory: Callable[..., Cluster]) -> None:
    """No checksum covers a name: without the frame MAC, the flipped byte would create a
    directory by another name. With it, the coordinator drops the connection, and / holds
    the name the client sent or nothing."""
    cluster = cluster_factory(nodes=1, replicas=1)
    proxy = FlippingProxy(cluster.coordinator)
    try:
        name = MARK.decode()
        cluster.dfs("mkdir", f"/{name}", env={"DFS_COORDINATOR": proxy.endpoint})
        assert proxy.flipped == 1
        listing = cluster.dfs("ls", "/").stdout.decode().split()
        named = [n.rstrip("/") for n in listing if n.startswith(("MARKER", "LARKER"))]
        assert named in ([], [name]), listing
        cluster.wait_until(lambda: "failed its MAC check" in cluster.log("coordinator", 400),
                           timeout=10, message="the coordinator's MAC failure line")
    finally:
        proxy.stop()
