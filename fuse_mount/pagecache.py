"""Which open handles may use the kernel page cache, so that no read is ever mixed
(`dfs mount --page-cache` only; without it every open is direct_io and this is not consulted).

The kernel's page cache and its file size belong to the inode, while in dfs a version belongs
to an open. So the pages an inode has in the kernel must always be one content: either one
committed version (ino, generation, version), shared by any number of readers of it, or one
writer's spool, and then that writer is the only handle open on the inode on this mount. The
rule, decided at open:

- a reader uses the page cache when no writer is open on the inode here and every handle that
  uses it reads the same version; a writer (not O_APPEND) only when no other handle is open;
- every other handle gets `direct_io` (its reads and writes bypass the page cache);
- a handle that brings a different content than the pages the kernel may hold (another
  version, or a writer) has those pages dropped before its open returns; one of the same
  version keeps them (`keep_cache`), so re-reading an unchanged file costs no request;
- while page-cached handles are open, the size this mount reports for the inode is theirs
  (inodes.py): the kernel clamps cached reads and mmap faults to its i_size.

A writer's pages are its spool: a clean commit makes them that new version's pages.

What the rule cannot prevent: a writer that opens here while page-cached handles are open
changes the kernel's i_size behind them (an O_TRUNC open sets it to 0, an extending direct
write raises it) until their next read fetches the size again, so a read() in flight at that
moment could stop short or run on (sizeback.py puts the size back for their mappings, whose
faults never fetch it). An inode where a writer has met another open handle here
is therefore "contended" for CONTENDED seconds, and then every open of it gets direct_io, as
all did before: one writer at a time, or readers alone, get the page cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fuse_mount.handles import FileHandle

#: What the kernel's pages of an inode hold: ("v", generation, version) or ("w", fh).
Content = tuple[str, int, int]

#: Seconds an inode stays direct_io-only after a writer met another open handle of it here.
CONTENDED = 10.0


def version_key(generation: int, version: int) -> Content:
    return ("v", generation, version)


@dataclass
class _Inode:
    content: Content | None = None  # what pages of this inode the kernel may hold
    holders: set[FileHandle] = field(default_factory=set)  # open page-cached handles
    contended_until: float = float("-inf")  # monotonic
    # A direct_io handle of other content was open: a private mmap of it may have put its
    # pages in, so once the holders are gone the pages count as unknown.
    tainted: bool = False


@dataclass(frozen=True)
class Admission:
    cached: bool  # the handle uses the page cache (else direct_io)
    keep: bool  # the kernel's pages of this inode are this handle's content already


class PageCacheRule:
    """Per inode of this mount: which content its kernel pages hold, and who reads them."""

    def __init__(self) -> None:
        self._inodes: dict[int, _Inode] = {}

    def admit(self, handle: FileHandle, others: list[FileHandle]) -> Admission:
        """Decide at open whether handle may use the page cache; others are the handles
        already open on its inode here."""
        state = self._inodes.setdefault(handle.ino, _Inode())
        base = version_key(handle.base.generation, handle.base.version)
        now = time.monotonic()
        if others and (handle.writable or any(h.writable for h in others)):
            state.contended_until = now + CONTENDED
        if now < state.contended_until:
            cached = False
        elif handle.writable:
            # O_APPEND: the kernel would place cached appends at its own i_size, which an
            # open cannot refresh; direct_io leaves the offset to the spool's size.
            cached = not others and not handle.append
        else:
            cached = all(h.content == base for h in state.holders)
        want: Content = ("w", handle.fh, 0) if handle.writable else base
        if not cached:
            if handle.writable or state.content != base:
                state.tainted = True
            return Admission(cached=False, keep=True)
        if not state.holders and state.tainted:
            state.content = None
        keep = state.content == base
        state.tainted = any(
            not h.cached and (h.writable or version_key(h.base.generation, h.base.version) != want)
            for h in others
        )
        state.content = want
        state.holders.add(handle)
        handle.content = want
        return Admission(cached=True, keep=keep)

    def release(self, handle: FileHandle) -> None:
        """A page-cached handle closed: its pages stay, known as its version if it has one."""
        state = self._inodes.get(handle.ino)
        if state is None or handle not in state.holders:
            return
        state.holders.discard(handle)
        if state.holders:
            return
        if state.tainted:
            state.content, state.tainted = None, False
        elif handle.writable:
            # A writer's pages are its spool: a known version only after a clean commit.
            state.content = (
                version_key(handle.base.generation, handle.base.version)
                if handle.synced else None
            )
        if state.content is None and time.monotonic() >= state.contended_until:
            del self._inodes[handle.ino]

    def holder(self, ino: int) -> FileHandle | None:
        """One open page-cached handle of ino (they all hold one content), or None."""
        state = self._inodes.get(ino)
        if state is None or not state.holders:
            return None
        return next(iter(state.holders))

    def forget(self, ino: int) -> None:
        """The kernel dropped the inode, and its pages with it."""
        state = self._inodes.get(ino)
        if state is not None and not state.holders:
            del self._inodes[ino]
