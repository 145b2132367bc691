"""Put the kernel's file size back under page-cached handles after a writer's O_TRUNC open
(`dfs mount --page-cache` only; docs/mount.md, "Page cache").

pyfuse3 always asks for atomic O_TRUNC, and after such an open succeeds the kernel sets the
inode's i_size to 0 and drops its pages (fs/fuse/file.c: fuse_open ->
fuse_truncate_update_attr, truncate_pagecache), asking nobody. The page-cached readers still
open on this mount keep their version, but the kernel now clamps their reads to 0 bytes and
their mappings fault SIGBUS, until something refreshes the size. A read() refreshes it
itself (auto_inval_data); a mapping's fault never does. So the mount stores the last page of
their content back (FUSE_NOTIFY_STORE raises i_size to the end of what it stores): once when
the writer's first request proves the kernel's truncate has happened, and a few times shortly
after the open, since the kernel truncates right after the open's reply, in the opener's own
call. What stays open is the gap between that truncate and the first store after it.
"""

from __future__ import annotations

import errno
import logging
import mmap
from typing import TYPE_CHECKING

import pyfuse3
import trio

if TYPE_CHECKING:
    from fuse_mount.pagecache import PageCacheRule

log = logging.getLogger(__name__)

#: Seconds after a writer's O_TRUNC open at which the holders' size is stored back.
DELAYS = (0.001, 0.01, 0.1, 1.0)
#: Opens waiting for the restorer; more are dropped (the writer's first request still restores).
PENDING = 256
#: Inodes with restores scheduled at once; more wait for their writer's first request.
ACTIVE = 64


class SizeBack:
    """Stores page-cached holders' last page back after the kernel truncated their inode."""

    def __init__(self, pages: PageCacheRule) -> None:
        self._pages = pages
        self._send, self._recv = trio.open_memory_channel[int](PENDING)
        self._opens: dict[int, int] = {}  # ino -> O_TRUNC opens seen while its task runs

    def soon(self, ino: int) -> None:
        """A writer's O_TRUNC open of ino is about to be answered."""
        try:
            self._send.send_nowait(ino)
        except trio.WouldBlock:
            pass

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async for ino in self._recv:
                if ino in self._opens:
                    self._opens[ino] += 1  # its task starts its delays over
                elif len(self._opens) < ACTIVE:
                    self._opens[ino] = 0
                    nursery.start_soon(self._after_opens, ino)

    async def _after_opens(self, ino: int) -> None:
        try:
            seen, step, waited = 0, 0, 0.0
            while step < len(DELAYS):
                await trio.sleep(DELAYS[step] - waited)
                waited = DELAYS[step]
                if not await self.restore(ino):
                    return
                step += 1
                if self._opens[ino] != seen:  # another truncating open: from the start
                    seen, step, waited = self._opens[ino], 0, 0.0
        except Exception:  # a background task: it must not take the mount down
            log.exception("size restore of inode %d failed", ino)
        finally:
            del self._opens[ino]

    async def restore(self, ino: int) -> bool:
        """Store the holders' last page; False once no page-cached handle holds ino."""
        holder = self._pages.holder(ino)
        if holder is None:
            return False
        size = holder.shown_size()
        if size == 0:
            return True
        start = (size - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            data = bytes(await holder.read(start, size - start))
        except Exception as e:  # the holder's own reads report their failure
            log.debug("size restore of inode %d: %s", ino, e)
            return True
        if len(data) != size - start:
            return True
        try:
            await trio.to_thread.run_sync(pyfuse3.notify_store, ino, start, data)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("notify_store(%d): %s", ino, e)
        return True
