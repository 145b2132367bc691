"""Frames on the wire (docs/design.md §4): a 4-byte big-endian length, then one msgpack map.

The length is checked against the limit before a byte of the body is read or allocated.
Sending and receiving are each cancel-safe where it matters for sharing a stream among many
calls: a cancelled receive loses no bytes (a partial frame stays buffered for the next
receiver), and a send cancelled part-way through a frame marks the stream `send_cut`, because
no later frame could follow it intact.

Without TLS, every frame after the handshake also carries a tag (`FrameMac`, docs/protocol.md
"Handshake, TLS and the frame MAC"): `length | body | HMAC-SHA256(key, seq | length | body)`, the key one of the two
the handshake derived (one per direction), seq the frame's number in its direction. A frame
whose tag does not match (altered, replayed, reordered, injected) is `FrameTampered`: the
connection ends there and the frame is never acted on.
"""

from __future__ import annotations

import hmac
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


class FrameTampered(ConnectionClosed):
    """A frame failed its MAC: someone on the path altered, replayed, reordered or injected
    it. A ConnectionClosed, so every reader ends the connection on it as on EOF."""


TAG_BYTES = 32  # HMAC-SHA256
_SEQ = struct.Struct(">Q")


class FrameMac:
    """The frame tags of one connection: a key and a sequence number per direction.

    The sequence numbers are never sent: each end counts the frames it sealed and checked, so
    a frame that arrives anywhere but in its place fails. HMAC objects are keyed once and
    copied per frame (the key schedule is not redone for every frame)."""

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._send = hmac.new(send_key, digestmod="sha256")
        self._receive = hmac.new(receive_key, digestmod="sha256")
        self.sent = 0
        self.received = 0

    def seal(self, frame: bytes | bytearray | memoryview) -> bytes:
        """The tag of the next frame sent (`frame`: length and body, as encoded)."""
        h = self._send.copy()
        h.update(_SEQ.pack(self.sent))
        h.update(frame)
        self.sent += 1
        return h.digest()

    def check(self, header: bytes | memoryview, body: bytes | bytearray | memoryview,
              tag: bytes | memoryview) -> None:
        """Raise FrameTampered unless `tag` is the next received frame's."""
        h = self._receive.copy()
        h.update(_SEQ.pack(self.received))
        h.update(header)
        h.update(body)
        if not hmac.compare_digest(h.digest(), bytes(tag)):
            raise FrameTampered(f"frame {self.received} failed its MAC check (altered, "
                                f"replayed, reordered or injected on the path)")
        self.received += 1


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
        self.mac: FrameMac | None = None  # set after the handshake on a connection without TLS

    def start_mac(self, mac: FrameMac) -> None:
        """From now on every frame is sealed and checked. Called by the one task doing the
        handshake, with nothing queued to send; bytes already received (a client that sent
        its first request before the handshake's last reply) are checked as tagged frames."""
        self.mac = mac

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
        write fails, the other frames' senders learn it from `error`; this one from the raise.

        A cancellation already delivered (a sender whose timeout ran out while it queued for
        the lock) is raised here, before a byte is written, with every frame still queued:
        raised inside `send_all` it would have marked the stream cut although nothing was
        sent, failing every call in flight. (checkpoint_if_cancelled does not yield, so no
        cancellation can arrive between it and send_all's first write.)"""
        await trio.lowlevel.checkpoint_if_cancelled()
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
            if self.mac is not None:  # sealed here, in wire order, under the send lock
                mac = self.mac
                data = b"".join(part for f in batch for part in (f.data, mac.seal(f.data)))
            else:
                data = batch[0].data if len(batch) == 1 else b"".join(f.data for f in batch)
            await self.stream.send_all(data)
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
        tag = TAG_BYTES if self.mac is not None else 0
        if size - (len(self._buf) - 4) >= DIRECT_BYTES and isinstance(
                self.stream, trio.SocketStream):
            return await self._receive_into(size, tag)
        await self._fill(4 + size + tag)
        with memoryview(self._buf) as view:
            if self.mac is not None:
                self.mac.check(view[:4], view[4 : 4 + size], view[4 + size : 4 + size + tag])
            body = bytes(view[4 : 4 + size])
        del self._buf[: 4 + size + tag]
        return body

    async def _receive_into(self, size: int, tag: int) -> bytearray:
        """A big body read straight into its own buffer (no per-read bytes objects joined
        into the stream buffer and sliced out again: two copies of every chunk fewer). Only
        this frame is read, so nothing of the next one is consumed. Cancelled part-way, what
        was read goes back into the stream buffer: no bytes are lost."""
        total = size + tag
        body = bytearray(total)
        have = len(self._buf) - 4
        body[:have] = memoryview(self._buf)[4:]
        header = bytes(self._buf[:4])
        self._buf.clear()
        sock = self.stream.socket  # type: ignore[attr-defined]
        try:
            with memoryview(body) as view:
                while have < total:
                    n = await sock.recv_into(view[have:], total - have)
                    if not n:
                        raise ConnectionClosed()
                    have += n
                if self.mac is not None:
                    self.mac.check(header, view[:size], view[size:])
        except BaseException:
            self._buf = bytearray(header) + body[:have]
            raise
        del body[size:]
        return body

    async def receive(self) -> dict[str, Any]:
        return decode(await self.receive_body())

    async def aclose(self) -> None:
        await self.stream.aclose()
