"""Per-open-file write spools (docs/design.md §7).

Every file handle opened for writing gets its own spool: an anonymous (already unlinked) file
in the spool directory that holds the whole content the handle will commit. Writes land in the
spool; flush/fsync stream the spool to the cluster as one transaction. Because the spool is
private to the handle, two writers never mix their bytes: each commit is exactly one writer's
content, and the last committer wins. Nothing is ever held whole in RAM: the spool lives on the
local disk and the client library streams it chunk by chunk.

Bulk I/O runs in worker threads so the trio thread (which serves every FUSE request) stays
free; tiny writes, the common case for small files, are done inline because a pwrite of a few
KiB into the page cache costs less than the thread hand-off.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import trio

#: I/O of at most this many bytes runs on the trio thread; larger I/O goes to a worker thread.
INLINE_IO = 64 * 1024


class Spool:
    """The private local copy of one open file's content, sized exactly like the file."""

    def __init__(self, fd: int, size: int = 0) -> None:
        self._fd = fd
        self.size = size
        self.closed = False

    @classmethod
    async def create(cls, directory: Path) -> Spool:
        """A new empty spool that no name refers to, so a crash leaves nothing behind.

        O_TMPFILE makes that one cheap syscall, done inline (every small file written needs
        a spool); where the local file system lacks it, mkstemp + unlink in a thread.
        """
        try:
            return cls(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise

        def make() -> int:
            fd, path = tempfile.mkstemp(prefix="spool-", dir=directory)
            os.unlink(path)
            return fd

        return cls(await trio.to_thread.run_sync(make))

    @property
    def fd(self) -> int:
        return self._fd

    async def write(self, offset: int, data: bytes) -> int:
        """Write at offset; a gap past the end stays a hole (reads as zeros, costs no disk)."""
        if len(data) <= INLINE_IO:
            n = _pwrite_all(self._fd, data, offset)
        else:
            n = await trio.to_thread.run_sync(_pwrite_all, self._fd, data, offset)
        if n:
            self.size = max(self.size, offset + n)
        return n

    async def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        if size <= INLINE_IO:
            return os.pread(self._fd, size, offset)
        return await trio.to_thread.run_sync(os.pread, self._fd, size, offset)

    async def truncate(self, size: int) -> None:
        """Shrink or extend (with a hole) to exactly size bytes."""
        await trio.to_thread.run_sync(os.ftruncate, self._fd, size)
        self.size = size

    async def fill_from(self, offset: int, data: bytes) -> None:
        """Store data copied from the committed version (a chunk at a time, in a thread)."""
        await trio.to_thread.run_sync(_pwrite_all, self._fd, data, offset)
        self.size = max(self.size, offset + len(data))

    def reader(self) -> BinaryIO:
        """A new, independent read-only file object over the spool, for the commit to stream.

        It is a separate open file description (via /proc/self/fd), so its seek position is
        its own and later pwrites to the spool cannot disturb it.
        """
        return open(f"/proc/self/fd/{self._fd}", "rb")  # noqa: SIM115 - the caller closes it

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def clear_directory(directory: Path) -> None:
    """Remove leftovers of an earlier run (spools are anonymous, so only stray files)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_file() or entry.is_symlink():
            entry.unlink(missing_ok=True)
