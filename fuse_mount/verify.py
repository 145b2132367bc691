"""Whole-file verification of what the mount serves (docs/mount.md, "Verified reads").

A chunk digest only proves a chunk is what its node stored; a replica can be consistent but
wrong (every chunk matching its digest, the whole file not matching the committed xxh3_128).
A mount cannot return bytes and then fail the read, so no byte of a version is served before
the whole version has been fetched and hashed against the committed xxh3_128. The first read
of a version fetches it spread over its replicas (chunk i from replica i mod R, a chunk whose
replica fails from the next, VERIFY_WINDOW chunks in flight, at most PER_REPLICA of them on
one replica) into the read cache, hashing in order: the hash proves the assembled bytes,
wherever each chunk came from. If it does not match (some replica is consistent but wrong),
the version is verified one replica at a time, as before: a replica that fails (bad whole
file, bad chunk, or no blob) is reported to the coordinator and the next one is tried; EIO
only when none is good. Chunks refetched later (evicted from the cache) come from the replica
that served that chunk when it verified; if it fails, the version is verified again.
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
#: Chunks fetched at once while verifying a version (the memory held: about this many chunks).
VERIFY_WINDOW = 12
#: Chunks in flight on one replica at a time while a version is verified spread over them.
PER_REPLICA = 4
#: Failed verifications remembered for the readers that waited on them.
FAILURES_KEPT = 1000
#: The node of a version adopted from this host's own spool (verified locally, no replica).
ADOPTED = -1

Version = tuple[int, int]  # (ino, version)


class Sources:
    """Where each chunk of a verified version came from: chunk i from rotation[i % len],
    except the few a failing replica moved elsewhere. Small whatever the file's size."""

    __slots__ = ("moved", "rotation")

    def __init__(self, rotation: tuple[int, ...], moved: dict[int, int] | None = None) -> None:
        self.rotation = rotation
        self.moved = moved or None

    def node_for(self, index: int) -> int:
        if self.moved is not None and index in self.moved:
            return self.moved[index]
        return self.rotation[index % len(self.rotation)]

    def nodes(self) -> set[int]:
        return set(self.rotation) | set((self.moved or {}).values())

    def __repr__(self) -> str:
        return f"Sources({self.rotation}, moved={self.moved})"
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


class _NoSpread(Exception):
    """A chunk no replica could give during a spread fetch: verify replica by replica."""


class Verifier:
    """Which replica of each version has been verified whole; verifies on demand, once per
    version at a time (concurrent readers wait for the same verification)."""

    def __init__(self, source: Source, store: StoreFn, drop: Callable[[Attr], None]) -> None:
        self.source = source
        self._store = store  # keep a verified-so-far chunk in the cache
        self._drop = drop  # forget a version's cached chunks (its replica proved bad)
        self._good: OrderedDict[Version, Sources] = OrderedDict()
        self._running: dict[Version, trio.Event] = {}
        # Why the last verification of a version failed, for the readers that waited on it.
        self._failed: OrderedDict[Version, DfsError] = OrderedDict()

    def trust(self, attr: Attr, node: int | Sources) -> None:
        sources = node if isinstance(node, Sources) else Sources((node,))
        self._good[(attr.ino, attr.version)] = sources
        self._good.move_to_end((attr.ino, attr.version))
        while len(self._good) > VERIFIED_KEPT:
            self._good.popitem(last=False)

    def distrust(self, attr: Attr, node: int) -> None:
        """A replica that served a verified chunk failed a later fetch: verify again."""
        ident = (attr.ino, attr.version)
        sources = self._good.get(ident)
        if sources is not None and node in sources.nodes():
            del self._good[ident]

    def good(self, attr: Attr) -> Sources | None:
        return self._good.get((attr.ino, attr.version))

    def is_verified(self, attr: Attr) -> bool:
        """Whether this version checked out already (a read of it needs no verification)."""
        return (attr.ino, attr.version) in self._good

    async def verified(self, attr: Attr) -> Sources:
        """Where each chunk of this version came from when it checked out whole (verifying
        if need be)."""
        ident = (attr.ino, attr.version)
        while True:
            sources = self._good.get(ident)
            if sources is not None:
                self._good.move_to_end(ident)
                return sources
            event = self._running.get(ident)
            if event is None:
                break
            await event.wait()
            if ident not in self._good and ident in self._failed:
                raise self._failed[ident]
        event = self._running[ident] = trio.Event()
        try:
            sources = await self._verify(attr)
            self._failed.pop(ident, None)
            self.trust(attr, sources)
            return sources
        except DfsError as e:
            self._failed[ident] = e
            while len(self._failed) > FAILURES_KEPT:
                self._failed.popitem(last=False)
            raise
        finally:
            del self._running[ident]
            event.set()

    async def _verify(self, attr: Attr) -> Sources:
        """Spread over the replicas first; if that does not check out, rounds over the
        replicas until one verifies whole (reported ones drop out)."""
        nodes = list(dict.fromkeys(attr.replicas))
        if not nodes:
            raise DfsError(Code.UNAVAILABLE, f"inode {attr.ino} lists no replicas")
        if len(nodes) > 1 and nchunks(attr.size) > 1:
            try:
                return await self._spread(attr, nodes)
            except (_Mismatch, _NoSpread) as e:
                self._drop(attr)
                log.info("inode %d version %d: spread read did not verify (%s); verifying "
                         "replica by replica", attr.ino, attr.version, e)
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
                    return Sources((node,))
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

    async def _spread(self, attr: Attr, nodes: list[int]) -> Sources:
        """Chunk i from nodes[i % R] (from the next ones if it fails), hashed in order;
        _Mismatch if the assembled file is not the committed version, _NoSpread if some chunk
        came from no replica. Failures were reported by the source where they prove a bad
        copy (a bad chunk, a missing blob)."""
        rotation = tuple(nodes)
        moved: dict[int, int] = {}
        limits = {node: trio.Semaphore(PER_REPLICA) for node in rotation}

        async def fetch(index: int) -> bytes:
            first = index % len(rotation)
            errors: list[str] = []
            for node in rotation[first:] + rotation[:first]:
                try:
                    async with limits[node]:
                        data = await self.source.chunk(attr, index, node)
                except DfsError as e:
                    errors.append(f"node {node}: {e.msg}")
                    continue
                if node != rotation[first]:
                    moved[index] = node
                return data
            raise _NoSpread(f"chunk {index}: " + "; ".join(errors))

        await self._fetch_all(attr, fetch)
        return Sources(rotation, moved)

    async def _whole(self, attr: Attr, node: int) -> None:
        """Fetch every chunk from `node`; _Mismatch if it is not the committed version."""

        async def fetch(index: int) -> bytes:
            return await self.source.chunk(attr, index, node)

        await self._fetch_all(attr, fetch)

    async def _fetch_all(self, attr: Attr, fetch: Callable[[int], Awaitable[bytes]]) -> None:
        """fetch every chunk, VERIFY_WINDOW ahead of the one being hashed and cached, in
        order; _Mismatch if the whole file is not the committed version."""
        hasher = FileHasher()

        async def consume(index: int, data: bytes) -> None:
            if len(data) != min(CHUNK_SIZE, attr.size - index * CHUNK_SIZE):
                raise _Mismatch(f"chunk {index} has the wrong length")
            hasher.update(data)
            await self._store(attr, index, data)

        await in_order(nchunks(attr.size), VERIFY_WINDOW, fetch, consume)
        if hasher.size != attr.size or (attr.checksum is not None
                                        and hasher.digest() != attr.checksum):
            raise _Mismatch(f"blob {attr.blob} fails its whole-file checksum")

