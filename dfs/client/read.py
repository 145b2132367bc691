"""Reads (DESIGN.md §6): chunks from one replica at a time, every byte verified.

A chunk is checked against the xxh3_64 digest the node stored with it (and its expected length),
the whole file against the committed xxh3_128. A replica that errs or returns bad bytes is skipped
(and reported when the bytes were bad); a replica that no longer has the blob means the version
was superseded and collected, so the reader gets ESTALE and should re-read the attributes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from dfs import runtime
from dfs.chunks import CHUNK_SIZE, FileHasher, chunk_digest, nchunks
from dfs.client.attr import Attr
from dfs.client.tasks import task_group
from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client.client import Client

log = logging.getLogger(__name__)

REPORT_TIMEOUT = 2.0


async def _report(client: Client, attr: Attr, node_id: int, reason: str) -> None:
    """Tell the coordinator a replica is bad (it queues a repair); never fails the read."""
    with trio.move_on_after(REPORT_TIMEOUT):
        try:
            await client.report_bad(attr.ino, attr.version, node_id, reason)
        except DfsError as e:
            log.debug("report_bad for node %d failed: %s", node_id, e)


def chunk_length(attr: Attr, index: int) -> int:
    return min(CHUNK_SIZE, attr.size - index * CHUNK_SIZE)


async def _from_replica(client: Client, attr: Attr, node_id: int, index: int) -> bytes:
    """One replica's copy of a chunk, verified; CHECKSUM if its bytes are bad."""
    peer = await client.node(node_id)
    reply = await peer.call("read", blob=attr.blob, index=index)
    data, digest = reply.get("data"), reply.get("digest")
    if not isinstance(data, bytes) or len(data) != chunk_length(attr, index):
        raise DfsError(Code.CHECKSUM, f"chunk {index} of blob {attr.blob} has the wrong length")
    if digest != chunk_digest(data):
        raise DfsError(Code.CHECKSUM, f"chunk {index} of blob {attr.blob} fails its digest")
    return data


async def read_chunk(client: Client, attr: Attr, index: int) -> bytes:
    """See Client.read_chunk. Rounds over the replicas until one answers or retry_for passes."""
    if attr.blob is None or not 0 <= index < nchunks(attr.size):
        raise DfsError(Code.EINVAL, f"inode {attr.ino} version {attr.version} has no chunk {index}")
    if not attr.replicas:
        raise DfsError(Code.UNAVAILABLE, f"inode {attr.ino} lists no replicas")
    deadline = trio.current_time() + client.retry_for
    delay = 0.05
    while True:
        errors: list[str] = []
        codes: set[Code] = set()
        for node_id in attr.replicas:
            try:
                return await _from_replica(client, attr, node_id, index)
            except DfsError as e:
                errors.append(f"node {node_id}: {e.msg}")
                codes.add(e.code)
                if e.code is Code.CHECKSUM:
                    await _report(client, attr, node_id, e.msg)
        if Code.ENOENT in codes:
            raise DfsError(
                Code.ESTALE, f"version {attr.version} of inode {attr.ino} is gone (superseded)"
            )
        if codes != {Code.UNAVAILABLE} or trio.current_time() + delay > deadline:
            code = Code.CHECKSUM if codes == {Code.CHECKSUM} else Code.UNAVAILABLE
            raise DfsError(code, f"chunk {index} of inode {attr.ino}: " + "; ".join(errors))
        # Every replica was unreachable: maybe they restarted on new addresses, maybe briefly.
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)
        try:
            await client.refresh_nodes()
        except DfsError as e:
            log.debug("node table refresh failed: %s", e)


Sink = BinaryIO | Callable[[bytes], Any]


def _writer(sink: Sink, hasher: FileHasher) -> Callable[[bytes], Awaitable[None]]:
    """Hash and deliver one chunk: file sinks are written in a worker thread."""
    if hasattr(sink, "write"):
        file = sink

        def hash_and_write(data: bytes) -> None:
            hasher.update(data)
            file.write(data)

        async def to_file(data: bytes) -> None:
            await runtime.in_thread(hash_and_write, data)

        return to_file

    async def to_callable(data: bytes) -> None:
        hasher.update(data)
        result = sink(data)
        if inspect.isawaitable(result):
            await result

    return to_callable


class _Slot:
    """One chunk being fetched ahead of the writer."""

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.data = b""


async def read_file(
    client: Client, attr: Attr, sink: Sink, progress: Callable[[int], Any] | None = None
) -> int:
    """See Client.read_file: up to `readahead` chunks are fetched while earlier ones are written."""
    hasher = FileHasher()
    deliver = _writer(sink, hasher)
    total = nchunks(attr.size) if attr.blob is not None else 0
    slots, in_order = trio.open_memory_channel[_Slot](max(client.readahead - 1, 0))

    async def fetch(index: int, slot: _Slot) -> None:
        slot.data = await read_chunk(client, attr, index)
        slot.ready.set()

    async with task_group() as group:

        async def schedule() -> None:
            async with slots:
                for index in range(total):
                    slot = _Slot()
                    await slots.send(slot)
                    group.start_soon(fetch, index, slot)

        async def write_in_order() -> None:
            async with in_order:
                async for slot in in_order:
                    await slot.ready.wait()
                    data, slot.data = slot.data, b""
                    await deliver(data)
                    if progress is not None:
                        progress(hasher.size)

        group.start_soon(schedule)
        group.start_soon(write_in_order)

    if hasher.size != attr.size:
        raise DfsError(Code.CHECKSUM, f"inode {attr.ino}: read {hasher.size} of {attr.size} bytes")
    if attr.checksum is not None and hasher.digest() != attr.checksum:
        raise DfsError(Code.CHECKSUM, f"inode {attr.ino} version {attr.version} fails its checksum")
    return hasher.size
