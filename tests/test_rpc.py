"""The frame codec, the authenticated handshake and the server's handling of bad input (I5)."""

from __future__ import annotations

import socket
import struct
from functools import partial
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from dfs import rpc
from dfs.errors import Code, DfsError
from dfs.wire import MAX_FRAME, ConnectionClosed, FrameStream, encode

SECRET = b"s" * 40


class Echo(rpc.Service):
    def __init__(self) -> None:
        self.calls = 0

    async def op_echo(self, req: rpc.Request) -> dict:
        reply = {"text": req.str("text"), "n": req.int("n", 0)}
        self.calls += 1
        return reply

    async def op_name(self, req: rpc.Request) -> dict:
        return {"name": req.name()}

    async def op_boom(self, req: rpc.Request) -> dict:
        raise RuntimeError("a bug")


@pytest.fixture
async def server(nursery):
    service = Echo()
    listeners = await nursery.start(rpc.serve, service, "127.0.0.1", 0, SECRET, lambda: "c1")
    port = listeners[0].socket.getsockname()[1]
    return service, f"127.0.0.1:{port}"


async def raw_connect(address: str) -> trio.SocketStream:
    host, port = rpc.parse_address(address)
    return await trio.open_tcp_stream(host, port)


async def authed_frames(address: str) -> FrameStream:
    """A handshaken raw connection, for sending hand-made frames after auth."""
    conn = await rpc.connect(address, SECRET)
    return conn.frames


async def test_round_trip_and_cluster_id(server) -> None:
    _, address = server
    peer = rpc.Peer(address, SECRET)
    assert (await peer.call("echo", text="hi", n=3))["text"] == "hi"
    assert peer.cluster == "c1"
    await peer.aclose()


async def test_wrong_secret_gets_auth_and_server_keeps_serving(server) -> None:
    _, address = server
    with pytest.raises(DfsError) as e:
        await rpc.connect(address, b"x" * 40)
    assert e.value.code is Code.AUTH
    # A client that skips verifying the server and sends a wrong MAC gets AUTH and a close.
    frames = FrameStream(await raw_connect(address))
    await frames.send({"op": "hello", "proto": rpc.PROTO, "nonce": b"n" * 16})
    assert (await frames.receive())["ok"]
    await frames.send({"op": "auth", "mac": b"\0" * 32})
    reply = await frames.receive()
    assert reply["error"] == "AUTH"
    with pytest.raises((ConnectionClosed, trio.BrokenResourceError)):
        await frames.receive()
    peer = rpc.Peer(address, SECRET)
    assert (await peer.call("echo", text="still up"))["text"] == "still up"


async def test_requests_before_auth_are_refused(server) -> None:
    service, address = server
    frames = FrameStream(await raw_connect(address))
    await frames.send({"op": "echo", "id": 1, "text": "sneaky"})
    reply = await frames.receive()
    assert not reply["ok"] and service.calls == 0


async def test_server_refuses_wrong_protocol_version(server) -> None:
    _, address = server
    frames = FrameStream(await raw_connect(address))
    await frames.send({"op": "hello", "proto": 99, "nonce": b"n" * 16})
    reply = await frames.receive()
    assert reply["error"] == "BAD_REQUEST" and "protocol" in reply["msg"]


async def test_expect_cluster_mismatch_is_auth(server) -> None:
    _, address = server
    with pytest.raises(DfsError) as e:
        await rpc.connect(address, SECRET, expect_cluster="other")
    assert e.value.code is Code.AUTH


async def test_garbage_unknown_op_missing_fields_and_bugs_get_errors(server) -> None:
    service, address = server
    frames = await authed_frames(address)
    body = b"\xc1\xc1garbage"
    await frames.send_frame(struct.pack(">I", len(body)) + body)
    assert (await frames.receive())["error"] == "BAD_REQUEST"
    await frames.send_frame(encode({"op": "nope", "id": 2}))
    reply = await frames.receive()
    assert reply == {"ok": False, "error": "BAD_REQUEST", "msg": "unknown op 'nope'", "id": 2}
    await frames.send_frame(encode({"op": "echo", "id": 3}))
    assert (await frames.receive())["error"] == "BAD_REQUEST"
    await frames.send_frame(encode({"op": "echo", "id": 4, "text": 5}))
    assert (await frames.receive())["error"] == "BAD_REQUEST"
    await frames.send_frame(encode({"op": "echo", "id": 5, "text": "x", "n": -1}))
    assert (await frames.receive())["error"] == "BAD_REQUEST"
    body = msgpack.packb([1, 2, 3])
    await frames.send_frame(struct.pack(">I", len(body)) + body)
    assert (await frames.receive())["error"] == "BAD_REQUEST"
    await frames.send_frame(encode({"op": "boom", "id": 6}))
    reply = await frames.receive()
    assert reply["error"] == "INTERNAL" and "a bug" not in reply["msg"]
    await frames.send_frame(encode({"op": "echo", "id": 7, "text": "ok"}))
    assert (await frames.receive())["text"] == "ok"
    assert service.calls == 1, "only the well-formed echo was served"


@pytest.mark.parametrize(
    "name, code",
    [(b"a/b", "EINVAL"), (b"a\0b", "EINVAL"), (b"..", "EINVAL"), (b".", "EINVAL"),
     (b"", "EINVAL"), (b"x" * 256, "ENAMETOOLONG")],
)
async def test_bad_names_are_refused(server, name: bytes, code: str) -> None:
    _, address = server
    peer = rpc.Peer(address, SECRET)
    with pytest.raises(DfsError) as e:
        await peer.call("name", name=name)
    assert e.value.code.value == code
    assert (await peer.call("name", name=b"x" * 255))["name"] == b"x" * 255


async def test_frame_over_the_limit_is_refused_before_reading_it(server) -> None:
    _, address = server
    frames = await authed_frames(address)
    # Announce a huge frame but send only the header: the server must answer at once.
    await frames.send_frame(struct.pack(">I", MAX_FRAME + 1))
    with trio.fail_after(5):
        reply = await frames.receive()
    assert reply["error"] == "TOO_BIG"
    with pytest.raises((ConnectionClosed, trio.BrokenResourceError)):
        await frames.receive()
    peer = rpc.Peer(address, SECRET)
    assert (await peer.call("echo", text="after"))["text"] == "after"


async def test_peer_reports_unavailable_for_a_dead_address() -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = rpc.Peer(f"127.0.0.1:{port}", SECRET, timeout=2)
    with pytest.raises(DfsError) as e:
        await peer.call("echo", text="x")
    assert e.value.code is Code.UNAVAILABLE


def test_secret_file_rules(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(DfsError):
        rpc.load_secret(short)
    with pytest.raises(DfsError):
        rpc.load_secret(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_text("a" * 64 + "\n")
    assert rpc.load_secret(good) == b"a" * 64


async def test_a_pooled_connection_to_a_restarted_peer_is_not_a_failure() -> None:
    """Regression (flaky vote-timeout test): after a node restarted on the same port, the
    coordinator's idle pooled connection to it was dead, and the next PREPARE failed at once
    as a NO vote. A request that meets a connection closed while idle goes on a new one."""
    async with trio.open_nursery() as outer:
        scope = trio.CancelScope()

        async def server(port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await rpc.serve(Echo(), "127.0.0.1", port, SECRET, lambda: "c1",
                                task_status=task_status)

        listeners = await outer.start(server, 0)
        port = listeners[0].socket.getsockname()[1]
        peer = rpc.Peer(f"127.0.0.1:{port}", SECRET, timeout=5)
        assert (await peer.call("echo", text="before"))["text"] == "before"
        scope.cancel()  # the peer goes away; our idle connection is now closed at its end
        await trio.sleep(0.1)
        scope = trio.CancelScope()
        await outer.start(server, port)
        assert (await peer.call("echo", text="after"))["text"] == "after"
        await peer.aclose()
        scope.cancel()


# ---------------------------------------------------------------- many calls per connection


class Slow(Echo):
    """Ops that take their time, and a record of the connections and concurrency seen."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: set[str] = set()  # client HOST:PORT: one per connection
        self.active = 0
        self.peak = 0
        self.release = trio.Event()

    async def op_sleep(self, req: rpc.Request) -> dict:
        self.connections.add(req.peer)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(req.int("ms") / 1000)
        finally:
            self.active -= 1
        return {"n": req.int("n")}

    async def op_hold(self, req: rpc.Request) -> dict:
        self.connections.add(req.peer)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        return {"n": req.int("n")}


@pytest.fixture
async def slow(nursery):
    service = Slow()
    listeners = await nursery.start(rpc.serve, service, "127.0.0.1", 0, SECRET, lambda: "c1")
    port = listeners[0].socket.getsockname()[1]
    return service, f"127.0.0.1:{port}"


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(slow) -> None:
    """50 calls at once travel on one connection; the server answers them concurrently and
    out of order (later calls sleep less), and each caller gets the reply to its request."""
    service, address = slow
    peer = rpc.Peer(address, SECRET)
    got: dict[int, int] = {}

    async def one(n: int) -> None:
        got[n] = (await peer.call("sleep", n=n, ms=5 + (50 - n) * 4))["n"]

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(one, n)
    assert got == {n: n for n in range(50)}
    assert len(service.connections) == 1
    assert service.peak > 25, "the server answered the connection's requests concurrently"
    assert trio.current_time() - start < 2.0  # the sleeps (~5 s in all) overlapped
    await peer.aclose()


async def test_a_request_no_connection_could_carry_is_not_sent() -> None:
    """Nobody listens: the request never went out (NotSent), which a caller of a change may
    send elsewhere; a timed-out call on an open connection is PeerUnavailable only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    peer = rpc.Peer(dead, SECRET, timeout=2)
    with pytest.raises(rpc.NotSent):
        await peer.call("echo", text="x")
    await peer.aclose()


async def test_a_timed_out_call_leaves_the_connection_to_the_others(slow) -> None:
    """The first call waiting reads replies for everyone; when it times out, the others keep
    their replies, later calls go on the same connection, and its late reply is dropped."""
    service, address = slow
    peer = rpc.Peer(address, SECRET, timeout=5)
    results: list[int] = []

    async def timed_out() -> None:
        with pytest.raises(rpc.PeerUnavailable) as e:
            await peer.call("sleep", n=0, ms=400, timeout=0.2)
        assert not isinstance(e.value, rpc.NotSent)  # it went out: maybe served

    async def quick(n: int) -> None:
        results.append((await peer.call("sleep", n=n, ms=300))["n"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timed_out)
        await trio.sleep(0.05)  # the timed-out call is now the one reading the connection
        for n in range(1, 6):
            nursery.start_soon(quick, n)
    assert sorted(results) == [1, 2, 3, 4, 5]
    await trio.sleep(0.2)  # the late reply to the timed-out call arrives, unclaimed
    assert (await peer.call("echo", text="after"))["text"] == "after"
    assert (await peer.call("sleep", n=7, ms=1))["n"] == 7
    assert len(service.connections) == 1
    await peer.aclose()


async def test_a_server_gone_mid_flight_fails_every_call_in_flight() -> None:
    """Calls in flight on a connection whose server goes away all fail at once with
    PeerUnavailable (the request may have been served): none waits for its timeout."""
    service = Slow()
    async with trio.open_nursery() as outer:
        scope = trio.CancelScope()

        async def server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await rpc.serve(service, "127.0.0.1", 0, SECRET, lambda: "c1",
                                task_status=task_status)

        listeners = await outer.start(server)
        peer = rpc.Peer(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", SECRET, timeout=10)
        failures: list[Exception] = []

        async def one(n: int) -> None:
            try:
                await peer.call("hold", n=n)
            except DfsError as e:
                failures.append(e)

        start = trio.current_time()
        async with trio.open_nursery() as calls:
            for n in range(20):
                calls.start_soon(one, n)
            while service.active < 20:
                await trio.sleep(0.01)
            scope.cancel()
        assert len(failures) == 20
        assert all(isinstance(e, rpc.PeerUnavailable) for e in failures)
        assert not any(isinstance(e, rpc.NotSent) for e in failures)  # they went out
        assert trio.current_time() - start < 3
        assert len(service.connections) == 1
        await peer.aclose()


async def test_the_server_limits_requests_in_flight_per_connection(slow, monkeypatch) -> None:
    """Past MAX_INFLIGHT requests being served on a connection the server reads no more of
    it until one ends (backpressure): the rest wait, unread, and are served in turn."""
    monkeypatch.setattr(rpc, "MAX_INFLIGHT", 4, raising=False)  # (absent before)
    service, address = slow
    conn = await rpc.connect(address, SECRET)
    replies: list[int] = []

    async def one(n: int) -> None:
        replies.append((await conn.call("hold", {"n": n}))["n"])

    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(one, n)
        with trio.fail_after(5):
            while service.active < 4:
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        assert service.active == 4, "no fifth request is read while four are served"
        service.release.set()
    assert sorted(replies) == list(range(12)) and service.peak == 4
    await conn.aclose()


async def test_a_request_over_the_frame_limit_fails_alone(server) -> None:
    """An oversized request is TOO_BIG at the caller, never sent, and the connection (with
    the other calls on it) goes on."""
    service, address = server
    peer = rpc.Peer(address, SECRET)
    assert (await peer.call("echo", text="before"))["text"] == "before"
    with pytest.raises(DfsError) as e:
        await peer.call("echo", text="x" * (MAX_FRAME + 1))
    assert e.value.code is Code.TOO_BIG
    assert (await peer.call("echo", text="after"))["text"] == "after"
    assert peer.connections_opened == 1
    await peer.aclose()


async def test_a_request_cut_short_by_its_timeout_spares_the_calls_in_flight(
        slow, monkeypatch) -> None:
    """A call whose timeout cuts its request part-way (the server, at its in-flight limit,
    is not reading) fails alone: the calls already in flight on that connection get their
    replies, and then the connection closes, since no frame can follow a cut one."""
    monkeypatch.setattr(rpc, "MAX_INFLIGHT", 2, raising=False)
    service, address = slow
    conn = await rpc.connect(address, SECRET)
    replies: list[int] = []

    async def held(n: int) -> None:
        replies.append((await conn.call("hold", {"n": n}))["n"])

    async with trio.open_nursery() as nursery:
        for n in range(2):
            nursery.start_soon(held, n)
        with trio.fail_after(5):
            while service.active < 2:
                await trio.sleep(0.01)
        with trio.move_on_after(0.5) as scope:  # 7 MiB cannot all go into unread buffers
            await conn.call("echo", {"text": "x" * (7 << 20)})
        assert scope.cancelled_caught and not conn.usable
        service.release.set()
    assert sorted(replies) == [0, 1]
    with pytest.raises(ConnectionClosed):
        await conn.call("echo", {"text": "after"})


async def test_small_calls_do_not_queue_behind_a_bulk_request(slow) -> None:
    """A request with a bulk payload rides its own connection: a small call made while it is
    in flight goes on another one and is answered at once."""
    service, address = slow
    peer = rpc.Peer(address, SECRET)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(peer.call, "hold", n=1, data=b"x" * (rpc.BULK_BYTES + 1)))
        with trio.fail_after(5):
            while service.active < 1:
                await trio.sleep(0.01)
        with trio.fail_after(2):
            assert (await peer.call("sleep", n=2, ms=1))["n"] == 2
        service.release.set()
    assert len(service.connections) == 2
    await peer.aclose()


async def test_calls_timing_out_all_around_never_strand_the_others(slow) -> None:
    """Many calls that time out (some while reading for the others, some just woken to read)
    mixed with quick ones: every quick call gets its reply; none waits out its timeout."""
    service, address = slow
    peer = rpc.Peer(address, SECRET, timeout=3)
    quick: list[int] = []

    async def doomed(n: int) -> None:
        with pytest.raises(rpc.PeerUnavailable):
            await peer.call("sleep", n=n, ms=200, timeout=0.01 + (n % 7) * 0.005)

    async def fast(n: int) -> None:
        quick.append((await peer.call("sleep", n=n, ms=n % 3))["n"])

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(120):
            nursery.start_soon(doomed if n % 2 else fast, n)
            if n % 10 == 0:
                await trio.sleep(0.005)
    assert sorted(quick) == list(range(0, 120, 2))
    assert trio.current_time() - start < 2.5, "a quick call waited out its timeout"
    assert len(service.connections) <= 2
    await peer.aclose()


async def _strand_once() -> list[str]:
    """Three calls on a connection over in-memory streams, the server's side played by hand:
    the first caller (reading for all) gets its reply and the second gives up at the same
    moment; then the third's reply arrives. What the callers got."""
    from dfs.mux import Connection

    to_server, from_server = trio.testing.MemorySendStream(), trio.testing.MemoryReceiveStream()
    conn = Connection(FrameStream(trio.StapledStream(to_server, from_server)), "c")
    got: list[str] = []
    scopes = [trio.CancelScope() for _ in range(3)]

    async def one(i: int) -> None:
        with scopes[i]:
            got.append((await conn.call("op", {"i": i}))["who"])

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
        assert to_server.get_data_nowait()  # the three requests, ids 1, 2, 3
        from_server.put_data(encode({"id": 1, "ok": True, "who": "first"}))
        scopes[1].cancel()  # both wake-ups land in the same scheduling batch, in either order
        await trio.testing.wait_all_tasks_blocked()
        from_server.put_data(encode({"id": 3, "ok": True, "who": "third"}))
        with trio.move_on_after(1):
            while len(got) < 2:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    return sorted(got)


async def test_a_waiter_woken_to_read_that_leaves_instead_passes_the_reading_on() -> None:
    """Regression (found in review): the reader got its reply and woke the next waiter to read
    on just as that one's timeout fired; it left, and the third waiter's reply sat unread.
    Trio runs the two wake-ups in either order, so the scene is played a few times."""
    for _ in range(12):
        assert await _strand_once() == ["first", "third"]


async def test_big_frames_read_straight_into_their_buffer_arrive_whole_and_in_order() -> None:
    """Over a real socket (where big bodies take the recv_into path): 1 MiB frames sent in
    odd-sized pieces, each followed at once by a small frame, all arrive intact."""
    import os

    a, b = trio.socket.socketpair()
    sender, frames = trio.SocketStream(a), FrameStream(trio.SocketStream(b))
    bodies = [os.urandom(1 << 20) for _ in range(4)]
    wire = b"".join(encode({"ok": True, "data": d}) + encode({"ok": True, "n": i})
                    for i, d in enumerate(bodies))

    async def send() -> None:
        for at in range(0, len(wire), 77_777):
            await sender.send_all(wire[at:at + 77_777])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        for i, data in enumerate(bodies):
            assert (await frames.receive())["data"] == data
            assert (await frames.receive())["n"] == i


async def test_a_receive_cancelled_inside_a_big_frame_loses_no_bytes() -> None:
    import os

    a, b = trio.socket.socketpair()
    sender, frames = trio.SocketStream(a), FrameStream(trio.SocketStream(b))
    data = os.urandom(1 << 20)
    wire = encode({"ok": True, "data": data})
    rest = trio.Event()

    async def send() -> None:
        await sender.send_all(wire[:300_000])
        await rest.wait()
        await sender.send_all(wire[300_000:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        with trio.move_on_after(0.5) as scope:
            await frames.receive()  # the rest of the body does not come in time
        assert scope.cancelled_caught
        rest.set()
        assert (await frames.receive())["data"] == data


async def test_a_sender_cancelled_while_it_queued_for_the_write_leaves_the_stream_whole() -> None:
    """A caller whose timeout runs out while another frame is being written (a loaded
    machine) gives up before its frame goes out: the stream is not cut, the frame is not
    sent, and the frames after it arrive intact."""
    a, b = trio.socket.socketpair()
    frames, receiver = FrameStream(trio.SocketStream(a)), FrameStream(trio.SocketStream(b))
    scope = trio.CancelScope()

    async def doomed() -> None:
        with scope:
            await frames.send({"ok": True, "n": "doomed"})

    async with trio.open_nursery() as nursery:
        await frames._send_lock.acquire()  # a write under way
        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()  # it queues for the lock
        frames._send_lock.release()  # it is given the lock...
        scope.cancel()  # ...and its timeout runs out before it runs
    assert scope.cancelled_caught
    assert not frames.send_cut
    await frames.send({"ok": True, "n": 2})
    assert (await receiver.receive())["n"] == 2
