"""Open files (docs/design.md §7: open-to-close, as in AFS).

A handle is pinned at open to one committed version (its `base`): reads come from that version
(through the read cache) until the handle writes, and from then on from the handle's private
spool. Opening for writing without O_TRUNC copies the base into the spool, but lazily, at the
first write or truncate, so the common open-read-close of an O_RDWR file costs no copy. A commit
streams the whole spool as one transaction; the handle is then based on the version it made.

Because each handle reads one version and writes one spool, whatever the kernel does with other
handles, a reader sees exactly one version per open and a commit is exactly one writer's bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dfs.chunks import CHUNK_SIZE, nchunks
from dfs.client import Client
from dfs.client.attr import Attr
from dfs.client.write import CommittedUnread
from fuse_mount.cache import ReadCache, ReadState
from fuse_mount.closes import Writer
from fuse_mount.remote import Remote
from fuse_mount.spool import Spool

log = logging.getLogger(__name__)

#: Chunks of the base version fetched concurrently while filling a spool.
COPY_WINDOW = 4
_touches = itertools.count(1)


#: Commits of multi-chunk files at once: each holds about the client's window of chunks in
#: memory, so this bounds the mount's RSS however many big files are closed together.
BIG_COMMITS = 6


@dataclass
class Services:
    """What every handle needs: the cluster, the retry policy, the cache and the spool dir."""

    client: Client
    remote: Remote
    cache: ReadCache
    spool_dir: Path
    big_commits: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(BIG_COMMITS)
    )


class FileHandle:
    """One open() of a regular file."""

    def __init__(self, fh: int, ino: int, flags: int, base: Attr, services: Services) -> None:
        self.fh = fh
        self.ino = ino
        self.flags = flags
        access = flags & os.O_ACCMODE
        self.writable = access in (os.O_WRONLY, os.O_RDWR)
        self.append = bool(flags & os.O_APPEND)
        self.base = base
        self.spool: Spool | None = None
        self.dirty = False
        self.gen = 0
        self.touched = 0
        self.mtime_ns: int | None = None
        self.kept: Attr | None = None
        self.orphaned = False  # its last name was removed while open
        # Who opened it (pid, uid), and whether that process may keep set-ID bits: asked
        # only when a write would otherwise drop them (fuse_mount/privs.py).
        self.opener = (0, 0)
        self.fsetid: bool | None = None
        # A writable handle's writer (closes.py): whose close is the end of the write.
        self.writer: Writer | None = None
        self.read_state = ReadState()
        # Page cache (pagecache.py): whether this handle uses it, the content its pages are,
        # and whether its content is still exactly its base version (no write since).
        self.cached = False
        self.content: tuple[str, int, int] | None = None
        self.synced = True
        # An O_TRUNC writer that met page-cached holders: its first request puts their size
        # back in the kernel (sizeback.py).
        self.size_back = False
        self._s = services
        self._spool_lock = trio.Lock()
        self._commit_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<FileHandle fh={self.fh} ino={self.ino} v={self.base.version} dirty={self.dirty}>"

    # ------------------------------------------------------------------ data

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        if self.spool is not None:
            return await self.spool.read(offset, size)
        return await self._s.cache.read(self.base, offset, size, self.read_state)

    async def write(self, offset: int, data: bytes) -> int:
        spool = await self._ensure_spool()
        if self.append:
            offset = spool.size
        n = await spool.write(offset, data)
        self.touch()
        return n

    async def truncate(self, size: int) -> None:
        """Shrink or extend to size; only the part of the base that survives is copied."""
        spool = await self._ensure_spool(limit=size)
        if spool.size != size:
            await spool.truncate(size)
            self.touch()
        elif self.base.size != size:
            self.touch()

    async def start_new(self) -> None:
        """A file this handle created unwritten: its first content is whatever the writer
        leaves, even nothing (`touch`), so the handle commits at its end however it wrote."""
        await self._ensure_spool(limit=0)
        self.touch()

    def touch(self, mtime_ns: int | None = None) -> None:
        """Note a change: the handle must commit, and its mtime is now (or the given one)."""
        self.dirty = True
        self.synced = False
        self.gen += 1
        self.touched = next(_touches)
        self.mtime_ns = mtime_ns if mtime_ns is not None else time.time_ns()

    async def _ensure_spool(self, limit: int | None = None) -> Spool:
        """The spool, created on first need holding the base's first `limit` bytes."""
        if self.spool is not None:
            return self.spool
        async with self._spool_lock:
            if self.spool is None:
                spool = await Spool.create(self._s.spool_dir)
                try:
                    upto = self.base.size if limit is None else min(limit, self.base.size)
                    await self._copy_base(spool, upto)
                except BaseException:
                    spool.close()
                    raise
                self.spool = spool
            return self.spool

    async def _copy_base(self, spool: Spool, upto: int) -> None:
        """Fill the spool with the base version's bytes [0, upto), COPY_WINDOW chunks at a time,
        so memory stays at a few chunks whatever the file size."""
        if upto == 0 or self.base.blob is None:
            return
        total = nchunks(upto)
        results: dict[int, bytes] = {}
        errors: list[Exception] = []

        async def get(index: int) -> None:
            try:
                results[index] = await self._s.remote.call(self._s.cache.chunk, self.base, index)
            except Exception as e:
                errors.append(e)

        for start in range(0, total, COPY_WINDOW):
            indexes = range(start, min(start + COPY_WINDOW, total))
            async with trio.open_nursery() as nursery:
                for index in indexes:
                    nursery.start_soon(get, index)
            if errors:
                raise errors[0]
            for index in indexes:
                data = results.pop(index)
                end = min(upto - index * CHUNK_SIZE, len(data))
                await spool.fill_from(index * CHUNK_SIZE, data[:end])
        if spool.size < upto:  # a hole at the end of the base (cannot happen, but be exact)
            await spool.truncate(upto)

    # ---------------------------------------------------------------- commit

    async def commit(self, conditional: bool = False) -> Attr | None:
        """Commit the spool as the file's next version; None if there was nothing to commit.

        A failure leaves the file at its previous version and the handle clean: the error is
        what close()/fsync() returns, as a local file system drops pages after a failed fsync.
        `conditional` (on_conflict=fail): only if the file is still at the handle's base, the
        version it opened or last committed itself, else CONFLICT (conflict.py).
        """
        async with self._commit_lock:
            if not self.dirty or self.spool is None:
                self.dirty = False
                return None
            gen = self.gen
            async with AsyncExitStack() as stack:
                if self.spool.size > CHUNK_SIZE:
                    await stack.enter_async_context(self._s.big_commits)
                attr = await self._send(gen, conditional)
            if self.gen == gen:
                self.dirty = False
                self.synced = True
                self._s.cache.adopt(attr, os.dup(self.spool.fd))
            self.base = attr
            return attr

    async def _send(self, gen: int, conditional: bool) -> Attr:
        """Stream the spool as one transaction; a failure cleans the handle (see commit)."""
        assert self.spool is not None
        reader = self.spool.reader()
        try:
            try:
                return await self._s.remote.call(
                    self._s.client.write_file,
                    self.ino,
                    reader,
                    base_version=self.base.version,
                    if_version=conditional,
                    mtime_ns=self.mtime_ns,
                )
            except CommittedUnread:
                # It landed; only what it made is unknown yet (never written again).
                return await self._s.remote.call(self._s.client.getattr, self.ino)
        except BaseException:
            if self.gen == gen:
                self.dirty = False
            raise
        finally:
            reader.close()

    def drop_writes(self) -> None:
        """Its writer was killed, or its mount stops: nothing of it will be committed (the
        spool goes at release, with the handle)."""
        self.dirty = False

    def shown_size(self) -> int:
        """The size of what this handle reads: its spool, or the version it opened."""
        return self.spool.size if self.spool is not None else self.base.size

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.kept is not None:
            self._s.cache.release(self.kept)
            self.kept = None

    def keep_readable(self) -> None:
        """The file's name is gone: hold its version in the cache until release."""
        self.orphaned = True
        if self.spool is None and self.kept is None:
            self.kept = self.base
            self._s.cache.keep(self.base)
