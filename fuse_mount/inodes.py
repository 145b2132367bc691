"""The mount's view of the inodes the kernel knows (docs/design.md §7, lookup counts).

The coordinator owns every attribute; this table only remembers, per inode the kernel holds,
how many lookups it owes us (readdirplus entries count, `forget` pays them back), the last
attributes seen, and the open file handles. That memory is what lets an unlinked-but-open file
keep answering `fstat` after the coordinator has forgotten it, and what lets `stat` of a file
being written show the size of its uncommitted content, as on a local disk.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import pyfuse3

from dfs.client.attr import Attr

if TYPE_CHECKING:
    from fuse_mount.handles import FileHandle

#: st_blksize: programs size their I/O buffers by it (cp, Python's io), and every request
#: through FUSE costs a round trip, so advertise the chunk size.
BLKSIZE = 1024 * 1024
ROOT = pyfuse3.ROOT_INODE
#: How many directories a path for a log line climbs.
PATH_DEPTH_MAX = 64


@dataclasses.dataclass(eq=False)
class Inode:
    attr: Attr
    lookups: int = 0
    parent: int = ROOT  # the directory it was last looked up in (a file's policy, `..`)
    name: bytes | None = None  # and its name there (for log lines)
    handles: set[FileHandle] = dataclasses.field(default_factory=set)
    presented: int | None = None  # the version the kernel last got attributes for
    presented_size: int | None = None  # and the size it was told
    fetched: float = float("-inf")  # when attr came from the coordinator (monotonic)
    epoch: int = 0  # the table's epoch then


class InodeTable:
    """Inodes the kernel knows, with exact lookup counts."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._inodes: dict[int, Inode] = {}
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._inodes)

    def get(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def update(self, attr: Attr) -> Inode:
        """Remember attributes just read from the cluster (never older ones over newer)."""
        node = self._inodes.get(attr.ino)
        if node is None:
            node = self._inodes[attr.ino] = Inode(attr)
        elif attr.version >= node.attr.version or attr.generation != node.attr.generation:
            node.attr = attr
        node.fetched = time.monotonic()
        node.epoch = self._epoch
        return node

    @property
    def epoch(self) -> int:
        return self._epoch

    def changed(self) -> None:
        """A namespace change here may have changed inodes it did not return (a parent's
        mtime, a removed file's nlink): no remembered attributes are current any more."""
        self._epoch += 1

    def stale(self, ino: int) -> None:
        node = self._inodes.get(ino)
        if node is not None:
            node.fetched = float("-inf")

    def cached(self, ino: int) -> tuple[Attr, float] | None:
        """Attributes read from the cluster less than `timeout` ago with nothing changed here
        since, and how much longer they may be trusted: what the kernel would still have had
        cached had it not dropped them (it does after every write, to re-read the size)."""
        node = self._inodes.get(ino)
        if node is None or node.epoch != self._epoch:
            return None
        left = self.timeout - (time.monotonic() - node.fetched)
        return (node.attr, left) if left > 0.05 else None

    def looked_up(self, attr: Attr, parent: int | None = None, name: bytes | None = None
                  ) -> pyfuse3.EntryAttributes:
        """The reply to a successful lookup-like request: the kernel now owes one forget."""
        node = self.update(attr)
        node.lookups += 1
        if parent is not None:
            node.parent = parent
            node.name = name
        return self.entry(attr)

    def looked_up_again(self, ino: int, left: float) -> pyfuse3.EntryAttributes | None:
        """A lookup answered from what this table already holds (listing.py), valid for the
        `left` seconds its attributes may still be trusted; None if they may not."""
        cached = self.cached(ino)
        node = self._inodes.get(ino)
        if cached is None or node is None:
            return None
        node.lookups += 1
        return self.entry(cached[0], min(left, cached[1]))

    def forget(self, ino: int, count: int) -> None:
        node = self._inodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(ino, node)

    def _maybe_drop(self, ino: int, node: Inode) -> None:
        if node.lookups == 0 and not node.handles and ino != ROOT:
            del self._inodes[ino]

    def add_handle(self, handle: FileHandle, attr: Attr) -> None:
        self.update(attr).handles.add(handle)

    def remove_handle(self, handle: FileHandle) -> None:
        node = self._inodes.get(handle.ino)
        if node is not None:
            node.handles.discard(handle)
            self._maybe_drop(handle.ino, node)

    def handles(self, ino: int) -> list[FileHandle]:
        node = self._inodes.get(ino)
        return list(node.handles) if node is not None else []

    def parent_of(self, ino: int) -> int:
        node = self._inodes.get(ino)
        return node.parent if node is not None else ROOT

    def path(self, ino: int) -> str:
        """ino's path under the mount as last looked up here ("?" where a name is unknown)."""
        parts: list[str] = []
        for _ in range(PATH_DEPTH_MAX):
            node = self._inodes.get(ino)
            if ino == ROOT or node is None or node.name is None:
                if ino != ROOT:
                    parts.append("?")
                break
            parts.append(node.name.decode(errors="replace"))
            ino = node.parent
        return "/" + "/".join(reversed(parts))

    def with_local_writes(self, attr: Attr) -> Attr:
        """attr as this host sees it: the newest uncommitted content of an open writer wins,
        so `stat` and lseek(SEEK_END) agree with what the writer just wrote; but while
        handles read through the kernel page cache, the size is theirs (pagecache.py), since
        the kernel clamps their reads and mmap faults to it."""
        node = self._inodes.get(attr.ino)
        if node is None or not node.handles:
            return attr
        shown = next((h for h in node.handles if h.cached), None)
        if shown is not None and shown.base.generation == attr.generation:
            if shown.dirty:
                mtime = shown.mtime_ns or attr.mtime_ns
                return dataclasses.replace(
                    attr, size=shown.shown_size(), mtime_ns=mtime,
                    ctime_ns=max(attr.ctime_ns, mtime),
                )
            return dataclasses.replace(attr, size=shown.shown_size())
        newest = None
        for handle in node.handles:
            if handle.dirty and handle.spool is not None:
                if newest is None or handle.touched > newest.touched:
                    newest = handle
        if newest is None or newest.spool is None:
            return attr
        mtime = newest.mtime_ns or attr.mtime_ns
        return dataclasses.replace(
            attr, size=newest.spool.size, mtime_ns=mtime, ctime_ns=max(attr.ctime_ns, mtime)
        )

    def entry(self, attr: Attr, timeout: float | None = None) -> pyfuse3.EntryAttributes:
        """EntryAttributes for the kernel, cached there for `timeout` seconds (never 0; the
        name too, where this answers a lookup)."""
        attr = self.with_local_writes(attr)
        node = self._inodes.get(attr.ino)
        if node is not None:
            node.presented = attr.version
            node.presented_size = attr.size
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = attr.generation
        e.entry_timeout = e.attr_timeout = self.timeout if timeout is None else timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        size = len(attr.target) if attr.target is not None and attr.is_symlink() else attr.size
        e.st_size = size
        e.st_blksize = BLKSIZE
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def negative(self) -> pyfuse3.EntryAttributes:
        """A cached "no such entry": saves a round trip for each repeated miss (git, make)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.timeout
        return e

    def all_handles(self) -> list[FileHandle]:
        return [h for node in self._inodes.values() for h in node.handles]

