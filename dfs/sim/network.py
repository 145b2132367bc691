"""The simulator's network: the real request and reply maps, carried between simulated
processes with seeded loss, delay, reordering, duplication and partitions.

It plugs in below `dfs.rpc` (`rpc.install_network`), so `Peer.call` and `rpc.serve` of the
real servers and the real client library run unchanged; a request reaches the same
`rpc._answer` -> `Service.dispatch` a TCP connection would. The handshake and the frame codec
are left out (tests/test_rpc.py covers them); every message is still msgpack-encoded and
decoded, so what a handler sees is what it would see off the wire.

What a message can meet, each drawn from the world's one seeded random source:
- delay: each direction takes a random time, so messages overtake each other (reordering);
- loss: a request or a reply vanishes, and the caller sees its timeout, as with a dead link;
- duplication: a request is delivered twice (as a retried request on a new connection would
  be); the second reply goes nowhere;
- partitions: a cut link refuses at once or swallows everything (a blackhole) until it heals;
- crashes: a process that is down refuses connections; a request delivered to it is lost,
  and the handlers of a crashed incarnation are cancelled with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from dfs import rpc, wire
from dfs.rpc import PeerUnavailable

if TYPE_CHECKING:
    from dfs.sim.watch import Watcher
    from dfs.sim.world import SimProcess, World

REFUSE_DELAY = 0.001  # a refused connection answers this fast


@dataclass
class _Listener:
    process: SimProcess
    incarnation: int
    service: rpc.Service
    handlers: trio.Nursery


class _Socket:
    def __init__(self, host: str, port: int) -> None:
        self._name = (host, port)

    def getsockname(self) -> tuple[str, int]:
        return self._name


class _BoundListener:
    """What `rpc.serve` reports as started: enough of a SocketListener to learn the port."""

    def __init__(self, host: str, port: int) -> None:
        self.socket = _Socket(host, port)


TRACED_FIELDS = ("txid", "txids", "ino", "blob", "blobs", "node_id", "parent", "name", "index")


class SimNetwork:
    def __init__(self, world: World, *, verbose: bool = False) -> None:
        self.world = world
        self.verbose = verbose  # every request and its reply in the trace (a replay's --verbose)
        self.watcher: Watcher | None = None  # rules checked at each reply (dfs/sim/watch.py)
        self._listeners: dict[str, _Listener] = {}
        self._ids = itertools.count(1)
        self.messages = 0

    # ------------------------------------------------------------ rpc.Network

    async def serve(self, service: rpc.Service, host: str, port: int, *,
                    task_status: trio.TaskStatus[Any]) -> None:
        process = self.world.current()
        address = f"{host}:{port}"
        async with trio.open_nursery() as handlers:
            listener = _Listener(process, process.incarnation, service, handlers)
            self._listeners[address] = listener
            task_status.started([_BoundListener(host, port)])
            try:
                await trio.sleep_forever()
            finally:
                if self._listeners.get(address) is listener:
                    del self._listeners[address]

    async def call(self, address: str, op: str, fields: dict[str, Any], timeout: float
                   ) -> dict[str, Any]:
        src = self.world.current()
        rid = next(self._ids)
        body = wire.encode({"op": op, "id": rid, **fields})[4:]  # the frame body
        reply: list[dict[str, Any]] = []
        answered = trio.Event()
        with trio.move_on_after(timeout):
            await self._send_request(src, address, body, reply, answered)
            await answered.wait()
        if not reply:
            raise PeerUnavailable(f"{address}: no reply in {timeout:g} s")
        return reply[0]

    # ------------------------------------------------------------ transit

    async def _send_request(self, src: SimProcess, address: str, body: bytes,
                            reply: list[dict[str, Any]], answered: trio.Event) -> None:
        world = self.world
        listener = self._listeners.get(address)
        if listener is None or not listener.process.up:
            await trio.sleep(REFUSE_DELAY)
            raise PeerUnavailable(f"{address}: connection refused")
        dst = listener.process
        link = world.link_state(src.name, dst.name)
        if link == "refuse":
            await trio.sleep(REFUSE_DELAY)
            raise PeerUnavailable(f"{address}: connection refused (partition)")
        copies = 2 if world.chance("duplicate") else 1
        for copy in range(copies):
            world.spawn(self._deliver, src, listener, body, reply if copy == 0 else None,
                        answered)

    async def _deliver(self, src: SimProcess, listener: _Listener, body: bytes,
                       reply: list[dict[str, Any]] | None, answered: trio.Event) -> None:
        world = self.world
        dst = listener.process
        await trio.sleep(world.delay())
        if world.link_state(src.name, dst.name) != "open" or world.chance("drop"):
            return
        if not dst.up or dst.incarnation != listener.incarnation:
            return
        self.messages += 1
        done = trio.Event()
        answer: list[dict[str, Any]] = []

        async def handle() -> None:
            world.enter(dst)
            try:
                answered_with = await rpc._answer(body, listener.service, src.name)
                if answered_with is None:  # InDoubt: left unanswered, as a crash would
                    return
                answer.append(answered_with)
                if self.watcher is not None:
                    self.watcher.on_reply(src.name, dst.name, wire.decode(body), answer[0])
                if self.verbose:
                    self._trace(src, dst, body, answer[0])
            finally:
                done.set()  # also when the incarnation is cancelled: the reply is lost

        try:
            listener.handlers.start_soon(handle)
        except RuntimeError:  # the incarnation is going down: its nursery is closed
            return
        await done.wait()
        if reply is None or not answer:
            return
        await trio.sleep(world.delay())
        if world.link_state(src.name, dst.name) != "open" or world.chance("drop"):
            return
        if src.up:
            reply.append(wire.decode(wire.encode(answer[0])[4:]))
            answered.set()

    def _trace(self, src: SimProcess, dst: SimProcess, body: bytes, reply: dict[str, Any]
               ) -> None:
        msg = wire.decode(body)
        fields = " ".join(f"{k}={msg[k]!r}" for k in TRACED_FIELDS if k in msg)
        if reply.get("ok"):
            outcome = "ok" + "".join(f" {k}={reply[k]!r}" for k in ("txid", "state", "node_id")
                                     if k in reply)
        else:
            outcome = f"{reply.get('error')}: {reply.get('msg')}"
        self.world.log(f"{src.name}->{dst.name} {msg.get('op')} {fields} -> {outcome}")
