"""Frames on the wire (docs/design.md §4): a 4-byte big-endian length, then one msgpack map.

The length is checked against the limit before a byte of the body is read or allocated.
Sending and receiving are each cancel-safe where it matters for sharing a stream among many
calls: a cancelled receive loses no bytes (a partial frame stays buffered for the next
receiver), and a send cancelled part-way through a frame marks the stream `send_cut`, because
no later frame could follow it intact.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import msgpack
import trio

from dfs.errors import Code, DfsError

MAX_FRAME = 8 * 1024 * 1024
_LEN = struct.Struct(">I")
_READ_SIZE = 256 * 1024
# A body with at least this much still to read is read straight into its own buffer.
DIRECT_BYTES = 64 * 1024


class FrameTooBig(DfsError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(Code.TOO_BIG, f"frame of {size} bytes exceeds the limit of {limit}")


class ConnectionClosed(Exception):
    """The peer closed the stream (cleanly, between frames, or in the middle of one)."""


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def decode(body: bytes | bytearray) -> dict[str, Any]:
    """Decode one frame body; anything but a msgpack map with a str "op" or "ok" is BAD_REQUEST."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise DfsError(Code.BAD_REQUEST, f"undecodable frame: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise DfsError(Code.BAD_REQUEST, "a frame must be a msgpack map")
    return msg


COALESCE_BYTES = 64 * 1024  # frames waiting to be sent are joined into one write up to this


class _Outgoing:
    __slots__ = ("data", "sent", "error")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = False
        self.error: BaseException | None = None


class FrameStream:
    """Reads and writes frames on a trio stream, buffering what the peer sent ahead."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._outgoing: deque[_Outgoing] = deque()
        self.send_cut = False  # a frame was cut short: nothing more may be sent on this stream

    async def send(self, msg: dict[str, Any]) -> None:
        await self.send_frame(encode(msg))

    async def send_frame(self, data: bytes) -> None:
        """Send one encoded frame whole, among concurrent senders (the replies of a
        connection's handlers, the requests of a peer's calls). Frames that queue up while a
        write is under way go out together in the next one, fewer writes and wake-ups for both
        ends. Returns once this frame is written; raises if it cannot be (ClosedResourceError
        when an earlier frame was cut short). Cancelled while queued, the frame is withdrawn."""
        if self.send_cut:
            raise trio.ClosedResourceError("an earlier frame was cut short")
        me = _Outgoing(data)
        self._outgoing.append(me)
        try:
            await self._send_lock.acquire()
        except BaseException:
            if not me.sent:
                self._outgoing.remove(me)
            raise
        try:
            while not me.sent:
                await self._write_batch(me)
        except BaseException:
            if not me.sent:
                self._outgoing.remove(me)
            raise
        finally:
            self._send_lock.release()
        if me.error is not None:
            raise trio.ClosedResourceError("the write carrying this frame failed") from me.error

    async def _write_batch(self, me: _Outgoing) -> None:
        """Write the queued frames from the front, up to COALESCE_BYTES (at least one). If the
        write fails, the other frames' senders learn it from `error`; this one from the raise."""
        batch = [self._outgoing.popleft()]
        size = len(batch[0].data)
        while self._outgoing and size + len(self._outgoing[0].data) <= COALESCE_BYTES:
            batch.append(self._outgoing.popleft())
            size += len(batch[-1].data)
        for frame in batch:
            frame.sent = True
        try:
            if self.send_cut:
                raise trio.ClosedResourceError("an earlier frame was cut short")
            await self.stream.send_all(
                batch[0].data if len(batch) == 1 else b"".join(f.data for f in batch))
        except BaseException as e:
            self.send_cut = True  # cancelled or broken part-way: the stream is unusable
            for frame in batch:
                if frame is not me:
                    frame.error = e
            raise

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(_READ_SIZE, n - len(self._buf)))
            if not chunk:
                raise ConnectionClosed()
            self._buf += chunk

    async def receive_body(self) -> bytes | bytearray:
        """One frame's raw body. Raises FrameTooBig before reading an over-long body."""
        await self._fill(4)
        (size,) = _LEN.unpack_from(self._buf)
        if size > self.max_frame:
            raise FrameTooBig(size, self.max_frame)
        if size - (len(self._buf) - 4) >= DIRECT_BYTES and isinstance(
                self.stream, trio.SocketStream):
            return await self._receive_into(size)
        await self._fill(4 + size)
        with memoryview(self._buf) as view:
            body = bytes(view[4 : 4 + size])
        del self._buf[: 4 + size]
        return body

    async def _receive_into(self, size: int) -> bytearray:
        """A big body read straight into its own buffer (no per-read bytes objects joined
        into the stream buffer and sliced out again: two copies of every chunk fewer). Only
        this frame is read, so nothing of the next one is consumed. Cancelled part-way, what
        was read goes back into the stream buffer: no bytes are lost."""
        body = bytearray(size)
        have = len(self._buf) - 4
        body[:have] = memoryview(self._buf)[4:]
        header = bytes(self._buf[:4])
        self._buf.clear()
        sock = self.stream.socket  # type: ignore[attr-defined]
        try:
            with memoryview(body) as view:
                while have < size:
                    n = await sock.recv_into(view[have:], size - have)
                    if not n:
                        raise ConnectionClosed()
                    have += n
        except BaseException:
            self._buf = bytearray(header) + body[:have]
            raise
        return body

    async def receive(self) -> dict[str, Any]:
        return decode(await self.receive_body())

    async def aclose(self) -> None:
        await self.stream.aclose()
