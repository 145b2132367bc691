"""Reads (docs/design.md §6): chunks from one replica at a time, every byte verified.

A chunk is checked against the xxh3_64 digest the node stored with it (and its expected length),
the whole file against the committed xxh3_128. A replica that errs is skipped; one that returns
bad bytes, or answers ENOENT for a blob the file still lists, is reported to the coordinator
(`report_bad`: its repair worker re-makes the copy) and failed over. Only when every replica
answers ENOENT was the version superseded and collected: the reader gets ESTALE and should
re-read the attributes. A client remembers the replicas it reported (a bounded memory per
client), so the rest of the file, and the next read of it, go to the good copies first.

The whole-file checksum can only be judged at the end: `read_file` then reports the replicas
that served the file, and, when the sink is a seekable file, starts over from the others.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from dfs import runtime
from dfs.chunks import FileHasher, chunk_length, chunk_problem, nchunks
from dfs.client.attr import Attr
from dfs.client.tasks import in_order
from dfs.errors import Code, DfsError
from dfs.rpc import Backoff

if TYPE_CHECKING:
    from dfs.client.client import Client

log = logging.getLogger(__name__)

REPORT_TIMEOUT = 2.0
#: Replicas a client remembers as reported bad, (ino, version, node) each, oldest forgotten.
SUSPECTS_KEPT = 4096
#: Passes of read_file over a seekable sink when the whole-file checksum fails.
WHOLE_FILE_PASSES = 3

_suspects: weakref.WeakKeyDictionary[Client, OrderedDict[tuple[int, int, int], None]] = (
    weakref.WeakKeyDictionary())


def _suspected(client: Client) -> OrderedDict[tuple[int, int, int], None]:
    table = _suspects.get(client)
    if table is None:
        table = _suspects[client] = OrderedDict()
    return table


def is_suspect(client: Client, attr: Attr, node_id: int) -> bool:
    return (attr.ino, attr.version, node_id) in _suspected(client)


def replica_order(client: Client, attr: Attr) -> list[int]:
    """The file's replicas, the ones this client reported bad last."""
    nodes = list(dict.fromkeys(attr.replicas))
    return sorted(nodes, key=lambda n: is_suspect(client, attr, n))


async def report(client: Client, attr: Attr, node_id: int, reason: str) -> None:
    """Tell the coordinator a replica is bad (it queues a repair), once per client and copy;
    never fails the read."""
    table = _suspected(client)
    key = (attr.ino, attr.version, node_id)
    if key in table:
        return
    table[key] = None
    while len(table) > SUSPECTS_KEPT:
        table.popitem(last=False)
    log.warning("inode %d version %d: node %d's copy is bad (%s); reported",
                attr.ino, attr.version, node_id, reason)
    with trio.move_on_after(REPORT_TIMEOUT):
        try:
            await client.report_bad(attr.ino, attr.version, node_id, reason)
        except DfsError as e:
            log.debug("report_bad for node %d failed: %s", node_id, e)


async def _from_replica(client: Client, attr: Attr, node_id: int, index: int) -> bytes:
    """One replica's copy of a chunk, verified; CHECKSUM if its bytes are bad."""
    peer = await client.node(node_id)
    reply = await peer.call("read", blob=attr.blob, index=index)
    data = reply.get("data")
    if problem := chunk_problem(data, reply.get("digest"), chunk_length(attr.size, index)):
        raise DfsError(Code.CHECKSUM, f"chunk {index} of blob {attr.blob} {problem}")
    assert isinstance(data, bytes)
    return data


async def read_chunk(client: Client, attr: Attr, index: int) -> bytes:
    """See Client.read_chunk. Rounds over the replicas until one answers or retry_for passes."""
    return (await read_chunk_from(client, attr, index))[0]


async def read_chunk_from(client: Client, attr: Attr, index: int,
                          nodes: Sequence[int] | None = None,
                          retry_for: float | None = None) -> tuple[bytes, int]:
    """A verified chunk and the node it came from, trying `nodes` (default: every replica,
    suspects last) in order, in rounds for `retry_for` (default the client's) while they are
    all unreachable. ENOENT and bad bytes are reported; ESTALE only when every node tried
    answered ENOENT."""
    if attr.blob is None or not 0 <= index < nchunks(attr.size):
        raise DfsError(Code.EINVAL, f"inode {attr.ino} version {attr.version} has no chunk {index}")
    order = replica_order(client, attr) if nodes is None else list(nodes)
    if not order:
        raise DfsError(Code.UNAVAILABLE, f"inode {attr.ino} lists no replicas")
    deadline = trio.current_time() + (client.retry_for if retry_for is None else retry_for)
    backoff = Backoff()
    while True:
        errors: list[str] = []
        codes: set[Code] = set()
        for node_id in order:
            try:
                return await _from_replica(client, attr, node_id, index), node_id
            except DfsError as e:
                errors.append(f"node {node_id}: {e.msg}")
                codes.add(e.code)
                if e.code is Code.CHECKSUM:
                    await report(client, attr, node_id, e.msg)
                elif e.code is Code.ENOENT:  # a listed copy is missing, or all were collected
                    await report(client, attr, node_id, f"blob {attr.blob} missing: {e.msg}")
        if codes == {Code.ENOENT}:
            raise DfsError(
                Code.ESTALE, f"version {attr.version} of inode {attr.ino} is gone (superseded)"
            )
        others = codes - {Code.ENOENT}
        # Every replica unreachable: maybe they restarted on new addresses, maybe briefly.
        if others != {Code.UNAVAILABLE} or not await backoff.wait(deadline):
            code = Code.CHECKSUM if others == {Code.CHECKSUM} else Code.UNAVAILABLE
            raise DfsError(code, f"chunk {index} of inode {attr.ino}: " + "; ".join(errors))
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


def _rewindable(sink: Sink) -> bool:
    """A sink read_file may empty and refill: a seekable, truncatable file."""
    try:
        return bool(sink.seekable()) and hasattr(sink, "truncate")  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return False


async def read_file(
    client: Client, attr: Attr, sink: Sink, progress: Callable[[int], Any] | None = None,
    nodes: Sequence[int] | None = None,
) -> int:
    """See Client.read_file. A whole-file checksum failure reports the replicas that served the
    bytes; into a seekable file the read then starts over (they now come last), else CHECKSUM.
    `nodes` pins the replicas to read from, in order (the mount verifies one at a time)."""
    passes = WHOLE_FILE_PASSES if _rewindable(sink) else 1
    start = await runtime.in_thread(sink.tell) if passes > 1 else 0  # type: ignore[union-attr]

    def rewind() -> None:
        sink.seek(start)  # type: ignore[union-attr]
        sink.truncate()  # type: ignore[union-attr]

    for attempt in range(passes):
        if attempt:
            await runtime.in_thread(rewind)
        try:
            return await _read_pass(client, attr, sink, progress, nodes)
        except _WholeFileMismatch as e:
            for node_id in sorted(e.sources):
                await report(client, attr, node_id, e.msg)
            if attempt + 1 == passes:
                raise DfsError(Code.CHECKSUM, e.msg) from None
    raise AssertionError("unreachable")


class _WholeFileMismatch(Exception):
    def __init__(self, msg: str, sources: set[int]) -> None:
        super().__init__(msg)
        self.msg = msg
        self.sources = sources


async def _read_pass(
    client: Client, attr: Attr, sink: Sink, progress: Callable[[int], Any] | None,
    nodes: Sequence[int] | None,
) -> int:
    """Up to `readahead` chunks are fetched while earlier ones are written."""
    hasher = FileHasher()
    deliver = _writer(sink, hasher)
    total = nchunks(attr.size) if attr.blob is not None else 0
    sources: set[int] = set()

    async def fetch(index: int) -> bytes:
        data, source = await read_chunk_from(client, attr, index, nodes)
        sources.add(source)
        return data

    async def write(index: int, data: bytes) -> None:
        await deliver(data)
        if progress is not None:
            progress(hasher.size)

    await in_order(total, client.readahead, fetch, write)

    if hasher.size != attr.size:
        raise DfsError(Code.CHECKSUM, f"inode {attr.ino}: read {hasher.size} of {attr.size} bytes")
    if attr.checksum is not None and hasher.digest() != attr.checksum:
        raise _WholeFileMismatch(
            f"inode {attr.ino} version {attr.version} fails its whole-file checksum "
            f"(chunks from nodes {sorted(sources)})", sources)
    return hasher.size
