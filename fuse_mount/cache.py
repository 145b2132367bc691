"""Local read cache of committed file content (docs/design.md §7).

Every version of every file is an immutable blob (docs/design.md §3), so a chunk cached under
(ino, version, index) can never go stale: there is no invalidation, only eviction. Chunks are
kept one file each under the cache directory, written under a temporary name and renamed into
place, so a reader never sees a partial chunk, eviction is an unlink, and a reader that opened a
chunk file keeps reading it even if the chunk is evicted meanwhile. The total is capped; the
least recently used chunks go first, except the versions that must stay readable because an open
file's name was removed or replaced (those are "kept" until the last handle is released).

Sequential readers get read-ahead: when a handle reads chunk i after chunk i-1, the next few
chunks are fetched in the background, so a cold sequential read overlaps network and disk. The
last few chunks read stay in memory too. Small files this host commits are cached from the
writer's spool ("adopted"), so reading back what was just written needs no node.

Nothing is served from a version before the whole of it has matched the committed xxh3_128
(fuse_mount/verify.py): the first read of a version fetches all of it into the cache, spread
over its replicas, replica by replica (reporting the bad ones) if that does not verify; later
fetches of a chunk come from the replica that served it then.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from dfs.chunks import CHUNK_SIZE, chunk_length, file_checksum, nchunks
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from fuse_mount.spool import INLINE_IO, clear_directory
from fuse_mount.verify import ADOPTED, FetchSource, Source, Verifier

log = logging.getLogger(__name__)

Fetch = Callable[[Attr, int], Awaitable[bytes]]
ChunkKey = tuple[int, int, int]  # (ino, version, chunk index)
#: Files up to this size are cached from the writer's spool when committed here.
ADOPT_MAX = 8 * CHUNK_SIZE


class ReadState:
    """Per-handle access pattern, used to decide on read-ahead."""

    __slots__ = ("next_chunk",)

    def __init__(self) -> None:
        self.next_chunk = 0


class ReadCache:
    """Chunks of committed versions on local disk, LRU-evicted beyond `capacity` bytes."""

    def __init__(
        self,
        directory: Path,
        capacity: int,
        fetch: Fetch | Source,
        *,
        readahead: int = 2,
        parallel: int = 4,
        hot_chunks: int = 12,
    ) -> None:
        self.directory = directory
        self.capacity = capacity
        self.readahead = readahead
        source = fetch if hasattr(fetch, "report") else FetchSource(fetch)  # type: ignore[arg-type]
        self._source: Source = source  # type: ignore[assignment]
        self.verifier = Verifier(self._source, self._store_verified, self._drop_version)
        self._present: collections.OrderedDict[ChunkKey, int] = collections.OrderedDict()
        # The last few chunks in memory: the kernel splits one read() into requests of
        # max_pages, and each would otherwise read the chunk file again.
        self._hot: collections.OrderedDict[ChunkKey, bytes] = collections.OrderedDict()
        self._hot_max = hot_chunks
        self._inflight: dict[ChunkKey, trio.Event] = {}
        self._keep: collections.Counter[tuple[int, int]] = collections.Counter()
        self._limiter = trio.CapacityLimiter(parallel)
        self._nursery: trio.Nursery | None = None
        self.total = 0
        # Reads answered from here alone / that fetched from the cluster (dfs.metrics.mount).
        self.hits = 0
        self.misses = 0
        clear_directory(directory)

    def start(self, nursery: trio.Nursery) -> None:
        """Give the cache a nursery for background fetches (read-ahead, keep-alive copies)."""
        self._nursery = nursery

    def _path(self, key: ChunkKey) -> str:
        return os.path.join(self.directory, "{}.{}.{}".format(*key))

    # ------------------------------------------------------------------ reads

    async def read(
        self, attr: Attr, offset: int, size: int, state: ReadState | None = None
    ) -> bytes | memoryview:
        """Bytes [offset, offset+size) of the version `attr` names, clipped at its size."""
        end = min(offset + size, attr.size)
        if attr.blob is None or offset >= end:
            return b""
        hit = self.verifier.is_verified(attr)
        await self.verifier.verified(attr)  # no byte of an unverified version goes out
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        if state is not None:
            if first in (state.next_chunk, state.next_chunk - 1) or first == 0:
                self._read_ahead(attr, last + 1)
            state.next_chunk = last + 1
        parts: list[bytes | memoryview] = []
        for index in range(first, last + 1):
            lo = max(offset, index * CHUNK_SIZE) - index * CHUNK_SIZE
            hi = min(end, (index + 1) * CHUNK_SIZE) - index * CHUNK_SIZE
            part, fetched = await self._slice(attr, index, lo, hi - lo)
            parts.append(part)
            hit = hit and not fetched
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunk(self, attr: Attr, index: int) -> bytes:
        """One whole chunk (for copying a version into a spool); not added to the cache."""
        await self.verifier.verified(attr)
        key = (attr.ino, attr.version, index)
        event = self._inflight.get(key)
        if event is not None:
            await event.wait()
        hot = self._hot.get(key)
        if hot is not None:
            return hot
        if key in self._present:
            data = await self._load(key, 0, chunk_length(attr.size, index))
            if data is not None:
                return data
        return await self._fetch_chunk(attr, index)

    async def _fetch_chunk(self, attr: Attr, index: int) -> bytes:
        """A chunk from the replica that served it when the version verified; if that fails,
        the version is verified again (which also refills the cache)."""
        key = (attr.ino, attr.version, index)
        error: DfsError | None = None
        for attempt in range(3):
            node = (await self.verifier.verified(attr)).node_for(index)
            if attempt and key in self._present:
                data = await self._load(key, 0, chunk_length(attr.size, index))
                if data is not None:
                    return data
            if node != ADOPTED:
                try:
                    return await self._source.chunk(attr, index, node)
                except DfsError as e:
                    if e.code is Code.ESTALE:
                        raise
                    log.info("chunk %s from its verified node %d: %s", key, node, e)
                    error = e
            self.verifier.distrust(attr, node)
        raise error or DfsError(Code.UNAVAILABLE, f"chunk {index} of inode {attr.ino}")

    async def _store_verified(self, attr: Attr, index: int, data: bytes) -> None:
        await self._store((attr.ino, attr.version, index), data)

    def _drop_version(self, attr: Attr) -> None:
        """A replica of this version proved bad: none of what it sent stays cached."""
        for key in [k for k in (*self._present, *self._hot) if k[:2] == (attr.ino, attr.version)]:
            self._drop(key)

    async def _slice(self, attr: Attr, index: int, lo: int, n: int
                     ) -> tuple[bytes | memoryview, bool]:
        """The bytes, and whether getting them waited for a fetch from the cluster."""
        key = (attr.ino, attr.version, index)
        fetched = False
        while True:
            data = self._hot.get(key)
            if data is not None:
                self._hot.move_to_end(key)
                return memoryview(data)[lo : lo + n], fetched
            if key in self._present:
                self._present.move_to_end(key)
                if n <= INLINE_IO // 4:  # a small read of a big file: no need for all of it
                    small = await self._load(key, lo, n)
                    if small is not None:
                        return small, fetched
                    continue
                data = await self._load(key, 0, chunk_length(attr.size, index))
                if data is not None:
                    self._make_hot(key, data)
                    return memoryview(data)[lo : lo + n], fetched
            event = self._inflight.get(key)
            fetched = True
            if event is not None:
                await event.wait()
                continue
            data = await self._fill(attr, index)
            self._make_hot(key, data)
            return memoryview(data)[lo : lo + n], fetched

    def _make_hot(self, key: ChunkKey, data: bytes) -> None:
        self._hot[key] = data
        while len(self._hot) > self._hot_max:
            self._hot.popitem(last=False)

    async def _load(self, key: ChunkKey, lo: int, n: int) -> bytes | None:
        """Read from a cached chunk file; None if it was evicted meanwhile (or is damaged)."""
        try:
            if n <= INLINE_IO:
                data = _pread_file(self._path(key), lo, n)
            else:
                data = await trio.to_thread.run_sync(_pread_file, self._path(key), lo, n)
        except FileNotFoundError:
            data = b""
        if len(data) != n:
            self._drop(key)
            return None
        return data

    async def _fill(self, attr: Attr, index: int) -> bytes:
        """Fetch one chunk from the cluster and store it; concurrent callers share the fetch."""
        key = (attr.ino, attr.version, index)
        event = self._inflight[key] = trio.Event()
        try:
            data = await self._fetch_chunk(attr, index)
            self._make_hot(key, data)
            if self._nursery is not None:  # readers need not wait for the local disk
                self._nursery.start_soon(self._store, key, data)
            else:
                await self._store(key, data)
            return data
        finally:
            del self._inflight[key]
            event.set()

    async def _store(self, key: ChunkKey, data: bytes) -> None:
        if key in self._present:
            return
        try:
            await trio.to_thread.run_sync(_write_file, self._path(key), data)
        except OSError as e:  # a full or failing cache disk costs speed, not correctness
            log.warning("cannot cache chunk %s: %s", key, e)
            return
        if key not in self._present:
            self._present[key] = len(data)
            self.total += len(data)
            self._evict()

    # ------------------------------------------------------------ background

    def _read_ahead(self, attr: Attr, start: int) -> None:
        if self._nursery is None:
            return
        stop = min(start + self.readahead, nchunks(attr.size))
        for index in range(start, stop):
            key = (attr.ino, attr.version, index)
            if key not in self._present and key not in self._inflight:
                self._nursery.start_soon(self._background_fill, attr, index)

    async def _background_fill(self, attr: Attr, index: int) -> None:
        key = (attr.ino, attr.version, index)
        async with self._limiter:
            if key in self._present or key in self._inflight:
                return
            try:
                await self._fill(attr, index)
            except Exception as e:  # a foreground read will retry and report it
                log.debug("read-ahead of %s failed: %s", key, e)

    def adopt(self, attr: Attr, fd: int) -> None:
        """Cache a version this host has just committed, from its spool (fd, a dup this call
        takes over): a program that writes a file and reads it back (git, compilers) gets it
        from here. Only small files, and only if the bytes match the committed checksum."""
        if self._nursery is None or attr.blob is None or not 0 < attr.size <= ADOPT_MAX:
            os.close(fd)
            return
        self._nursery.start_soon(self._adopt, attr, fd)

    async def _adopt(self, attr: Attr, fd: int) -> None:
        try:
            data = await trio.to_thread.run_sync(os.pread, fd, attr.size, 0)
        finally:
            os.close(fd)
        if len(data) != attr.size or file_checksum(data) != attr.checksum:
            return  # the spool moved on after the commit: not this version's bytes
        for index in range(nchunks(attr.size)):
            key = (attr.ino, attr.version, index)
            if key not in self._present:
                await self._store(key, data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE])
        if self.verifier.good(attr) is None:
            self.verifier.trust(attr, ADOPTED)  # checked against the checksum above

    def keep(self, attr: Attr) -> None:
        """Keep this version readable until `release`: its name is gone, so after the
        cluster's grace period only this cache still has the bytes. Fetches what is missing."""
        if attr.blob is None or not attr.is_file():
            return
        ident = (attr.ino, attr.version)
        self._keep[ident] += 1
        if self._keep[ident] == 1 and self._nursery is not None:
            for index in range(nchunks(attr.size)):
                if (attr.ino, attr.version, index) not in self._present:
                    self._nursery.start_soon(self._background_fill, attr, index)

    def release(self, attr: Attr) -> None:
        ident = (attr.ino, attr.version)
        if self._keep.get(ident):
            self._keep[ident] -= 1
            if not self._keep[ident]:
                del self._keep[ident]
                self._evict()

    # -------------------------------------------------------------- eviction

    def _drop(self, key: ChunkKey) -> None:
        self._hot.pop(key, None)
        size = self._present.pop(key, None)
        if size is not None:
            self.total -= size
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def _evict(self) -> None:
        if self.total <= self.capacity:
            return
        for key in list(self._present):
            if self.total <= self.capacity:
                break
            if (key[0], key[1]) in self._keep:
                continue
            self._drop(key)

    def close(self) -> None:
        for key in list(self._present):
            self._drop(key)


def _pread_file(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    """Write a whole chunk file under a temporary name, then rename it into place: a reader
    never sees a partial chunk, even when two stores of one chunk race."""
    tmp = f"{path}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)
    os.replace(tmp, path)
