"""Whole-file verification of what the mount serves (docs/mount.md, "Verified reads").

A chunk digest only proves a chunk is what its node stored; a replica can be consistent but
wrong (every chunk matching its digest, the whole file not matching the committed xxh3_128).
A mount cannot return bytes and then fail the read, so no byte of a version is served before
one replica's whole copy has been fetched and hashed: the first read of a version streams it
from one replica (VERIFY_WINDOW chunks in flight) into the read cache, checks the whole-file
checksum, and only then answers. A replica that fails (bad whole file, bad chunk, or no blob)
is reported to the coordinator and the next one is tried; EIO only when none is good. Chunks
refetched later (evicted from the cache) come from that verified replica only; if it fails,
the version is verified again from another.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from dfs.chunks import CHUNK_SIZE, FileHasher, nchunks
from dfs.client.attr import Attr
from dfs.client.tasks import in_order
from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client import Client

log = logging.getLogger(__name__)

#: Versions whose verified replica is remembered (LRU); a forgotten one is verified again.
VERIFIED_KEPT = 100_000
#: Chunks fetched at once while verifying one replica (the memory held: this many chunks).
VERIFY_WINDOW = 8
#: Failed verifications remembered for the readers that waited on them.
FAILURES_KEPT = 1000
#: The node of a version adopted from this host's own spool (verified locally, no replica).
ADOPTED = -1

Version = tuple[int, int]  # (ino, version)
StoreFn = Callable[[Attr, int, bytes], Awaitable[None]]


class Source(Protocol):
    """Where chunks come from: one node at a time, and whom to tell about a bad copy."""

    retry_for: float

    async def chunk(self, attr: Attr, index: int, node: int) -> bytes: ...

    async def report(self, attr: Attr, node: int, reason: str) -> None: ...


class ClientSource:
    """The cluster through the client library: verified chunks, reports via report_bad."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.retry_for = client.retry_for

    async def chunk(self, attr: Attr, index: int, node: int) -> bytes:
        from dfs.client import read

        return (await read.read_chunk_from(self.client, attr, index, [node], retry_for=0.0))[0]

    async def report(self, attr: Attr, node: int, reason: str) -> None:
        from dfs.client import read

        await read.report(self.client, attr, node, reason)


class FetchSource:
    """A plain `fetch(attr, index)` (tests, tools) seen as a Source: every node is the same."""

    retry_for = 0.0

    def __init__(self, fetch: Callable[[Attr, int], Awaitable[bytes]]) -> None:
        self._fetch = fetch

    async def chunk(self, attr: Attr, index: int, node: int) -> bytes:
        return await self._fetch(attr, index)

    async def report(self, attr: Attr, node: int, reason: str) -> None:
        log.warning("inode %d version %d: node %d's copy is bad: %s", attr.ino, attr.version,
                    node, reason)


class _Mismatch(Exception):
    pass


class Verifier:
    """Which replica of each version has been verified whole; verifies on demand, once per
    version at a time (concurrent readers wait for the same verification)."""

    def __init__(self, source: Source, store: StoreFn, drop: Callable[[Attr], None]) -> None:
        self.source = source
        self._store = store  # keep a verified-so-far chunk in the cache
        self._drop = drop  # forget a version's cached chunks (its replica proved bad)
        self._good: OrderedDict[Version, int] = OrderedDict()
        self._running: dict[Version, trio.Event] = {}
        # Why the last verification of a version failed, for the readers that waited on it.
        self._failed: OrderedDict[Version, DfsError] = OrderedDict()

    def trust(self, attr: Attr, node: int) -> None:
        self._good[(attr.ino, attr.version)] = node
        self._good.move_to_end((attr.ino, attr.version))
        while len(self._good) > VERIFIED_KEPT:
            self._good.popitem(last=False)

    def distrust(self, attr: Attr, node: int) -> None:
        """The verified replica failed a later fetch: verify again (from any replica)."""
        ident = (attr.ino, attr.version)
        if self._good.get(ident) == node:
            del self._good[ident]

    def good(self, attr: Attr) -> int | None:
        return self._good.get((attr.ino, attr.version))

    async def verified(self, attr: Attr) -> int:
        """The node whose whole copy of this version checked out (verifying if need be)."""
        ident = (attr.ino, attr.version)
        while True:
            node = self._good.get(ident)
            if node is not None:
                self._good.move_to_end(ident)
                return node
            event = self._running.get(ident)
            if event is None:
                break
            await event.wait()
            if ident not in self._good and ident in self._failed:
                raise self._failed[ident]
        event = self._running[ident] = trio.Event()
        try:
            node = await self._verify(attr)
            self._failed.pop(ident, None)
            self.trust(attr, node)
            return node
        except DfsError as e:
            self._failed[ident] = e
            while len(self._failed) > FAILURES_KEPT:
                self._failed.popitem(last=False)
            raise
        finally:
            del self._running[ident]
            event.set()

    async def _verify(self, attr: Attr) -> int:
        """Rounds over the replicas until one verifies whole; reported ones drop out."""
        nodes = list(dict.fromkeys(attr.replicas))
        if not nodes:
            raise DfsError(Code.UNAVAILABLE, f"inode {attr.ino} lists no replicas")
        deadline = trio.current_time() + self.source.retry_for
        delay = 0.05
        bad: dict[int, str] = {}
        gone: set[int] = set()
        while True:
            unreachable: list[str] = []
            for node in nodes:
                if node in bad or node in gone:
                    continue
                try:
                    await self._whole(attr, node)
                    return node
                except _Mismatch as e:
                    bad[node] = str(e)
                    self._drop(attr)
                    await self.source.report(attr, node, str(e))
                except DfsError as e:
                    self._drop(attr)
                    if e.code is Code.ESTALE:  # this node has no blob (read.py reported it)
                        gone.add(node)
                    elif e.code is Code.CHECKSUM:  # a bad chunk (read.py reported it)
                        bad[node] = e.msg
                    else:
                        unreachable.append(f"node {node}: {e.msg}")
            if len(gone) == len(nodes):
                raise DfsError(Code.ESTALE,
                               f"version {attr.version} of inode {attr.ino} is gone (superseded)")
            if not unreachable:
                raise DfsError(Code.CHECKSUM, f"inode {attr.ino} version {attr.version}: no "
                               "replica verifies: " + "; ".join(f"node {n}: {m}"
                                                                for n, m in bad.items()))
            if trio.current_time() + delay > deadline:
                raise DfsError(Code.UNAVAILABLE, f"inode {attr.ino}: " + "; ".join(unreachable))
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _whole(self, attr: Attr, node: int) -> None:
        """Fetch every chunk from `node`, VERIFY_WINDOW ahead of the one being hashed and
        cached, in order; _Mismatch if the whole file is not the committed version."""
        hasher = FileHasher()

        async def fetch(index: int) -> bytes:
            return await self.source.chunk(attr, index, node)

        async def consume(index: int, data: bytes) -> None:
            if len(data) != min(CHUNK_SIZE, attr.size - index * CHUNK_SIZE):
                raise _Mismatch(f"chunk {index} has the wrong length")
            hasher.update(data)
            await self._store(attr, index, data)

        await in_order(nchunks(attr.size), VERIFY_WINDOW, fetch, consume)
        if hasher.size != attr.size or (attr.checksum is not None
                                        and hasher.digest() != attr.checksum):
            raise _Mismatch(f"blob {attr.blob} fails its whole-file checksum")

