"""The mount's local parts without FUSE or a cluster: spools, the read cache, retries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from dfs.chunks import CHUNK_SIZE, file_checksum
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from dfs.rpc import PeerUnavailable
from fuse_mount.cache import ReadCache, ReadState
from fuse_mount.main import parse_size
from fuse_mount.remote import MaybeDone, Remote
from fuse_mount.spool import Spool


def version(ino: int, ver: int, data: bytes) -> Attr:
    return Attr(ino=ino, mode=0o100644, size=len(data), version=ver, blob=ver * 100 + ino,
                checksum=file_checksum(data), replicas=(1, 2, 3))


class Blobs:
    """A fake cluster: chunk reads of known versions, counted."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, int], bytes] = {}
        self.fetches = 0

    def add(self, ino: int, ver: int, data: bytes) -> Attr:
        self.data[(ino, ver)] = data
        return version(ino, ver, data)

    async def fetch(self, attr: Attr, index: int) -> bytes:
        self.fetches += 1
        await trio.sleep(0)
        data = self.data.get((attr.ino, attr.version))
        if data is None:
            raise DfsError(Code.ESTALE, "gone")
        return data[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]


async def test_spool_sparse_writes_truncate_and_reader(tmp_path: Path) -> None:
    spool = await Spool.create(tmp_path)
    assert list(tmp_path.iterdir()) == []  # anonymous: nothing to clean up after a crash
    await spool.write(3 * CHUNK_SIZE, b"end")
    await spool.write(5, b"x" * 200_000)  # large: written from a thread
    assert spool.size == 3 * CHUNK_SIZE + 3
    assert await spool.read(0, 6) == b"\0" * 5 + b"x"
    assert await spool.read(3 * CHUNK_SIZE, 100) == b"end"
    await spool.truncate(10)
    assert spool.size == 10 and await spool.read(0, 100) == b"\0" * 5 + b"x" * 5
    await spool.truncate(20)
    reader = spool.reader()
    reader.seek(4)
    await spool.write(0, b"A")  # the reader has its own offset
    assert reader.read() == b"\0xxxxx" + b"\0" * 10
    reader.close()
    spool.close()


async def test_cache_reads_across_chunks_and_evicts_lru(tmp_path: Path) -> None:
    blobs = Blobs()
    big = blobs.add(7, 1, os.urandom(3 * CHUNK_SIZE + 10))
    cache = ReadCache(tmp_path, 2 * CHUNK_SIZE, blobs.fetch, hot_chunks=1)
    data = blobs.data[(7, 1)]
    assert await cache.read(big, CHUNK_SIZE - 5, 10) == data[CHUNK_SIZE - 5 : CHUNK_SIZE + 5]
    assert await cache.read(big, 3 * CHUNK_SIZE, 100) == data[3 * CHUNK_SIZE :]
    assert await cache.read(big, big.size, 10) == b""
    assert cache.total <= cache.capacity
    fetched = blobs.fetches
    assert await cache.read(big, 3 * CHUNK_SIZE + 1, 5) == data[3 * CHUNK_SIZE + 1 : 3 * CHUNK_SIZE + 6]
    assert blobs.fetches == fetched  # still cached
    assert len(list(tmp_path.iterdir())) * CHUNK_SIZE <= cache.capacity + CHUNK_SIZE


async def test_cache_kept_versions_survive_eviction(tmp_path: Path) -> None:
    blobs = Blobs()
    kept = blobs.add(1, 1, os.urandom(2 * CHUNK_SIZE))
    other = blobs.add(2, 1, os.urandom(2 * CHUNK_SIZE))
    async with trio.open_nursery() as nursery:
        cache = ReadCache(tmp_path, CHUNK_SIZE, blobs.fetch, hot_chunks=0)
        cache.start(nursery)
        cache.keep(kept)  # fetches every chunk in the background
        await trio.sleep(0.2)
        await cache.read(other, 0, 2 * CHUNK_SIZE)
        await trio.sleep(0.2)
        content = blobs.data.pop((1, 1))  # the cluster collected it: only the cache has it now
        assert await cache.read(kept, 0, 2 * CHUNK_SIZE) == content
        cache.release(kept)
        nursery.cancel_scope.cancel()


async def test_cache_adopts_only_matching_bytes(tmp_path: Path) -> None:
    blobs = Blobs()
    async with trio.open_nursery() as nursery:
        cache = ReadCache(tmp_path, 1 << 30, blobs.fetch)
        cache.start(nursery)
        spool = await Spool.create(tmp_path)
        await spool.write(0, b"committed bytes")
        good = version(3, 1, b"committed bytes")
        cache.adopt(good, os.dup(spool.fd))
        bad = version(3, 2, b"other bytes")
        cache.adopt(bad, os.dup(spool.fd))
        await trio.sleep(0.2)
        assert await cache.read(good, 0, 100) == b"committed bytes"
        assert blobs.fetches == 0
        with pytest.raises(DfsError):
            await cache.read(bad, 0, 100)  # not adopted: fetched, and the fake has nothing
        spool.close()
        nursery.cancel_scope.cancel()


async def test_cache_fetches_a_version_whole_before_serving_it(tmp_path: Path) -> None:
    """The first read verifies the whole version (docs/mount.md, verified reads): every chunk
    is fetched once, and nothing again while they stay cached."""
    blobs = Blobs()
    attr = blobs.add(4, 1, os.urandom(6 * CHUNK_SIZE))
    async with trio.open_nursery() as nursery:
        cache = ReadCache(tmp_path, 1 << 30, blobs.fetch, readahead=2)
        cache.start(nursery)
        state = ReadState()
        await cache.read(attr, 0, 100, state)
        await trio.sleep(0.1)
        assert blobs.fetches == 6
        await cache.read(attr, 5 * CHUNK_SIZE, 10, ReadState())
        await trio.sleep(0.1)
        assert blobs.fetches == 6
        nursery.cancel_scope.cancel()


async def test_remote_retries_then_gives_up() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise PeerUnavailable("connection refused")
        return "ok"

    assert await Remote(5).call(flaky) == "ok"

    async def down() -> None:
        raise PeerUnavailable("down")

    with trio.fail_after(5):
        with pytest.raises(DfsError) as e:
            await Remote(0.3).call(down)
    assert e.value.code is Code.UNAVAILABLE

    attempts = 0

    async def lost_then_exists() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise PeerUnavailable("reply lost")
        raise DfsError(Code.EEXIST, "exists")

    with pytest.raises(MaybeDone):
        await Remote(5).call(lost_then_exists, done_if=Code.EEXIST)

    async def exists() -> None:
        raise DfsError(Code.EEXIST, "exists")

    with pytest.raises(DfsError):  # a plain EEXIST is an answer, not a lost request
        await Remote(5).call(exists, done_if=Code.EEXIST)


def test_parse_size() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096


def test_page_cache_rule_admits_one_content_per_inode() -> None:
    """Readers of one version share the kernel's pages, a writer only alone; another version,
    or anyone while a writer met another handle, gets direct_io (fuse_mount/pagecache.py)."""
    from fuse_mount.handles import FileHandle
    from fuse_mount.pagecache import PageCacheRule

    rule = PageCacheRule()
    fhs = iter(range(1, 100))
    open_: list[FileHandle] = []

    def admit(ver: int, flags: int = os.O_RDONLY) -> tuple[FileHandle, bool, bool]:
        handle = FileHandle(next(fhs), 7, flags, version(7, ver, b"x" * ver), None)  # type: ignore[arg-type]
        got = rule.admit(handle, list(open_))
        handle.cached = got.cached
        open_.append(handle)
        return handle, got.cached, got.keep

    def close(handle: FileHandle) -> None:
        open_.remove(handle)
        rule.release(handle)

    r1, cached, keep = admit(5)
    assert (cached, keep) == (True, False)  # first open of v5: the kernel's pages are dropped
    r2, cached, keep = admit(5)
    assert (cached, keep) == (True, True)  # same version: shares them
    r3, cached, _ = admit(6)
    assert not cached  # another version while v5 is cached: direct_io
    for h in (r1, r2, r3):
        close(h)
    _, cached, keep = admit(6)
    assert (cached, keep) == (True, False)  # v6 now, after v5's pages are dropped
    close(open_[0])
    w, cached, keep = admit(6, os.O_RDWR)
    assert (cached, keep) == (True, True)  # a lone writer; its pages start as its base
    w.touch()
    w.synced = True  # as after a clean commit of ...
    w.base = version(7, 8, b"y")  # ... version 8
    close(w)
    _, cached, keep = admit(8)
    assert (cached, keep) == (True, True)  # the writer's pages are version 8's
    _, cached, _ = admit(8, os.O_WRONLY)
    assert not cached  # a writer meets a reader: direct_io, and the inode is contended
    for h in list(open_):
        close(h)
    _, cached, _ = admit(8)
    assert not cached  # contended: direct_io for a while even alone
