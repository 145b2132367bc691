"""One client connection carrying many calls at once, replies matched by id (docs/design.md §4).

It is made by `dfs.rpc.connect` after the handshake and used by `dfs.rpc.Peer`; it knows
frames and ids, nothing of ops or the cluster secret.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
from typing import Any

import trio

from dfs.errors import DfsError
from dfs.wire import (
    MAX_FRAME,
    ConnectionClosed,
    FrameStream,
    FrameTampered,
    FrameTooBig,
    decode,
    encode,
)

log = logging.getLogger(__name__)


class _Waiter:
    """One call in flight on a connection: where its reply lands, and how it is woken."""

    __slots__ = ("reply", "wake")

    def __init__(self) -> None:
        self.reply: dict[str, Any] | None = None
        self.wake = trio.Event()


class Connection:
    """One authenticated client connection carrying many calls at once, replies matched by id.

    There is no background reader (so a Connection needs no nursery and works wherever a Peer
    is made, inside `async with` or not): the first caller waiting for a reply reads frames for
    everyone, hands each reply to its waiter, and when its own arrives (or it is cancelled)
    wakes another waiter to read on. A reply whose caller gave up (timed out) is dropped. If the
    stream breaks, every call in flight fails with ConnectionClosed; if a request is cut short
    part-way (its caller cancelled mid-send), no new call may start, the calls in flight still
    get their replies, and the last one out closes the connection.
    """

    def __init__(self, frames: FrameStream, cluster: str) -> None:
        self.frames = frames
        self.cluster = cluster
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._reading = False
        self._failure: str | None = None  # why the stream broke, once it has
        self._closed = False
        self.bulk = 0  # calls in flight whose request carries a bulk payload

    @property
    def inflight(self) -> int:
        return len(self._waiters)

    @property
    def usable(self) -> bool:
        """Whether a new call may start on it."""
        return self._failure is None and not self._closed and not self.frames.send_cut

    def closed_by_peer(self) -> bool:
        """With no call in flight, whether the peer has closed its end (it exited or
        restarted): the socket reads as EOF or reset, without consuming a byte. A request
        never goes out on such a connection, so it is surely not served there."""
        if self._waiters or not self.usable:
            return False
        stream = self.frames.stream
        tls = isinstance(stream, trio.SSLStream)
        sock = (stream.transport_stream if tls else stream).socket  # type: ignore[attr-defined]
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        if not poll.poll(0):
            return False  # nothing to read: open (the common case, one system call)
        if tls:  # encrypted: a close_notify looks like data. Anything arriving on an idle
            self._failure = "readable while idle (TLS)"  # link is dropped with it (a late
            return True  # reply at worst): a new connection costs a handshake, nothing more
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        try:
            closed = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True  # reset
        finally:
            raw.detach()  # the fd stays trio's
        if closed:
            self._failure = "closed by the peer while idle"
        return closed

    async def call(self, op: str, fields: dict[str, Any], *, bulk: bool = False
                   ) -> dict[str, Any]:
        """One request and its reply map. A request over the frame limit is TOO_BIG here,
        never sent."""
        rid = next(self._ids)
        data = encode({"op": op, "id": rid, **fields})
        if len(data) - 4 > MAX_FRAME:
            raise FrameTooBig(len(data) - 4, MAX_FRAME)
        if not self.usable:
            raise ConnectionClosed(self._failure or "connection closed")
        waiter = _Waiter()
        self._waiters[rid] = waiter
        self.bulk += bulk
        try:
            await self.frames.send_frame(data)
            return await self._wait(waiter)
        finally:
            del self._waiters[rid]
            self.bulk -= bulk
            self._hand_off(waiter)  # it may have been woken to read, and be leaving instead
            if not self._waiters and (self._failure or self.frames.send_cut):
                await self.aclose()

    async def _wait(self, me: _Waiter) -> dict[str, Any]:
        while me.reply is None:
            if self._failure is not None:
                raise ConnectionClosed(self._failure)
            if self._reading:
                me.wake = trio.Event()
                await me.wake.wait()
                continue
            self._reading = True
            try:
                await self._read_until(me)
            finally:
                self._reading = False
                self._hand_off(me)
        return me.reply

    def _hand_off(self, me: _Waiter) -> None:
        """With nobody reading, wake a waiter still without its reply to read on (a spare
        wake-up is harmless: it finds a reader, or its reply, and waits again)."""
        if self._reading:
            return
        for other in self._waiters.values():
            if other.reply is None and other is not me:
                other.wake.set()
                return

    async def _read_until(self, me: _Waiter) -> None:
        """Read frames, delivering each to its waiter, until `me` has its reply."""
        while me.reply is None and self._failure is None:
            try:
                msg = decode(await self.frames.receive_body())
            except (ConnectionClosed, OSError, trio.BrokenResourceError,
                    trio.ClosedResourceError, DfsError) as e:
                if isinstance(e, FrameTampered):
                    log.warning("connection closed: %s", e)
                self._fail(f"{type(e).__name__} {e}".strip())
                return
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool):
                self._fail(f"reply without a request id: {msg.get('error')} {msg.get('msg')}")
                return
            waiter = self._waiters.get(rid)
            if waiter is not None:  # else: the reply to a call that gave up, dropped
                waiter.reply = msg
                waiter.wake.set()

    def _fail(self, why: str) -> None:
        self._failure = why
        for waiter in self._waiters.values():
            waiter.wake.set()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.frames.aclose()
            except (trio.BrokenResourceError, OSError):
                pass
