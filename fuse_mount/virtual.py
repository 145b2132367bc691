"""Virtual read-only trees inside the mount (docs/mount.md, "Versions and snapshots").

A name no real entry can take (the coordinator refuses it: dfs/meta/inode.py RESERVED_NAMES)
opens, in every directory, a tree the mount makes up from cluster queries, the way ZFS shows
`.zfs`: reachable by lookup, never listed by the directory, read-only. Each level of such a tree
is a node kind: a `VirtualDir` looks names up and lists pages of entries, a `VirtualFile` is one
committed version of a dfs file, read through the read cache (and so verified) like any file.
versions.py has the kinds of `.versions`; a `.snapshots` tree adds its own the same way.

Virtual inode numbers have the high bit set, so they never meet a real one (dfs numbers inodes
from a counter starting at 2). Each node key (what a node shows, e.g. version 3 of file 812) gets
a number while the kernel holds it, with exact lookup counts as for real inodes; the last
`forget` drops it, and a number is never given again.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
import trio

from dfs.client import Client
from dfs.client.attr import Attr
from fuse_mount.cache import ReadCache, ReadState
from fuse_mount.handler import check_name, handler
from fuse_mount.inodes import InodeTable
from fuse_mount.remote import Remote

log = logging.getLogger(__name__)

#: The mount's own numbers (bits 63 and 62 set) are above every number the coordinator gives:
#: live inodes are below 2^40, a snapshot's below 2^63 + 2^62 (dfs/meta/snapshots.py).
VIRTUAL_BASE = 1 << 63 | 1 << 62
#: Virtual inodes held at once (by the kernel's lookups or open handles); a lookup or listing
#: page that starts beyond it is ENFILE until the kernel forgets some.
NODES_MAX = 262_144
#: Entries asked from the cluster per readdir page of a virtual directory.
READDIR_BATCH = 512
#: Entry invalidations waiting for the worker (beyond, the entry timeout bounds staleness).
INVALIDATIONS_MAX = 4096
DOTS = 2  # readdir offsets 1 and 2 are "." and ".."; an entry's cookie c is offset c + 2
DIR_MODE = stat.S_IFDIR | 0o555
#: What a read-only copy of a file loses: write bits, and set-ID bits (an old version of a
#: set-ID program must not keep running with its owner's rights after a fix replaced it).
DROPPED_BITS = 0o222 | stat.S_ISUID | stat.S_ISGID

Key = tuple[Hashable, ...]
N = TypeVar("N", bound="Node")


def is_virtual(ino: int) -> bool:
    return ino >= VIRTUAL_BASE


def dir_attr(real: Attr, ino: int) -> Attr:
    """A virtual directory's attributes: read-only, owner and times from the real inode."""
    return dataclasses.replace(real, ino=ino, mode=DIR_MODE, nlink=2, size=0, version=0,
                               blob=None, checksum=None, replicas=(), target=None, rdev=0,
                               generation=0)


def file_attr(content: Attr, ino: int) -> Attr:
    """A version shown as a file: its size and mtime, the file's mode without write bits."""
    mode = stat.S_IFREG | (stat.S_IMODE(content.mode) & ~DROPPED_BITS)
    return dataclasses.replace(content, ino=ino, mode=mode, nlink=1, target=None, rdev=0,
                               atime_ns=content.mtime_ns, ctime_ns=content.mtime_ns,
                               generation=0)


class Node:
    """One virtual inode; its kind says what it shows. Numbered by the tree."""

    def __init__(self, parent: int) -> None:
        self.parent = parent  # the directory it was first found in (`..`)
        self.key: Key = ()
        self.ino = 0
        self.lookups = 0
        self.opened = 0
        self.attr: Attr | None = None
        self.fetched = float("-inf")

    def remember(self, attr: Attr) -> Attr:
        self.attr, self.fetched = attr, time.monotonic()
        return attr

    async def fetch(self, tree: VirtualTree) -> Attr:
        """Fresh attributes from the cluster (ino = this node's), remembered."""
        raise NotImplementedError


@dataclass
class Page:
    """Entries of a virtual directory after a cookie, in cookie order (cookies > 0)."""

    entries: list[tuple[bytes, int, Node]]
    after: int  # the cookie to continue after
    complete: bool


class VirtualDir(Node):
    async def child(self, tree: VirtualTree, name: bytes) -> Node | None:
        """The entry called name, with its attributes remembered; None if there is none."""
        raise NotImplementedError

    async def page(self, tree: VirtualTree, after: int, limit: int) -> Page:
        raise NotImplementedError


class VirtualFile(Node):
    def __init__(self, parent: int) -> None:
        super().__init__(parent)
        self.content: Attr | None = None  # the dfs version read: real ino, version, replicas

    def shows(self, content: Attr) -> Attr:
        self.content = content
        return self.remember(file_attr(content, self.ino))


@dataclass
class DirHandle:
    node: VirtualDir
    done_after: int | None = None  # a complete page ended here: the next readdir is empty


@dataclass
class Reader:
    node: Node
    content: Attr
    state: ReadState = dataclasses.field(default_factory=ReadState)


class VirtualTree:
    """The virtual nodes the kernel holds, and the requests made on them (read-only)."""

    def __init__(self, client: Client, remote: Remote, cache: ReadCache, table: InodeTable,
                 fhs: itertools.count[int], roots: dict[bytes, Callable[[int], VirtualDir]],
                 nodes_max: int = NODES_MAX) -> None:
        self.client = client
        self.remote = remote
        self.cache = cache
        self.table = table  # for the real tree's EntryAttributes and negative entries
        self.roots = roots  # name -> the node kind it opens in a real directory
        self.nodes_max = nodes_max
        self._fhs = fhs
        self._nodes: dict[int, Node] = {}
        self._keys: dict[Key, int] = {}
        self._numbers = itertools.count(VIRTUAL_BASE + 1)
        self.dirs: dict[int, DirHandle] = {}
        self.files: dict[int, Reader] = {}
        self._inval_send, self._inval_recv = trio.open_memory_channel[tuple[int, bytes]](
            INVALIDATIONS_MAX)

    def __len__(self) -> int:
        return len(self._nodes)

    # ----------------------------------------------------------------- table

    def node(self, key: Key, make: Callable[[], N]) -> N:
        """The node for key: the one the kernel holds, or a new one (held by nobody yet)."""
        ino = self._keys.get(key)
        if ino is not None:
            return self._nodes[ino]  # type: ignore[return-value]
        node = make()
        node.key, node.ino = key, next(self._numbers)
        self._nodes[node.ino] = node
        self._keys[key] = node.ino
        return node

    def _room(self) -> None:
        """Before a lookup or a listing page, which may make nodes: ENFILE at the limit (a
        page may pass it by one page of entries)."""
        if len(self._nodes) >= self.nodes_max:
            raise pyfuse3.FUSEError(errno.ENFILE)

    def unheld(self, node: Node) -> None:
        """Drop node if neither the kernel nor an open handle holds it."""
        if node.lookups <= 0 and node.opened <= 0 and self._nodes.get(node.ino) is node:
            del self._nodes[node.ino]
            del self._keys[node.key]

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self.unheld(node)

    def parent_of(self, ino: int) -> int:
        node = self._nodes.get(ino)
        return node.parent if node is not None else pyfuse3.ROOT_INODE

    def _get(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _dir(self, ino: int) -> VirtualDir:
        node = self._get(ino)
        if not isinstance(node, VirtualDir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _looked_up(self, node: Node, attr: Attr, left: float | None = None
                   ) -> pyfuse3.EntryAttributes:
        """The reply to a lookup: the kernel owes one forget, and may cache it `left` s."""
        node.lookups += 1
        return self.table.entry(attr, left)

    async def _attr(self, node: Node) -> tuple[Attr, float | None]:
        """Its attributes, fetched again once the attribute timeout has passed."""
        left = self.table.timeout - (time.monotonic() - node.fetched)
        if node.attr is not None and left > 0.05:
            return node.attr, left
        try:
            return await node.fetch(self), None
        except BaseException:
            self.unheld(node)  # a node made for this request that turned out not to be
            raise

    # ---------------------------------------------------------- invalidation

    def changed(self, directory: int, name: bytes) -> None:
        """A name in a real directory changed through this mount: the kernel must not keep
        answering D/.versions/NAME from before it (it may have cached it, or its absence)."""
        for root in self.roots:
            ino = self._keys.get((root, directory))
            if ino is not None:
                try:
                    self._inval_send.send_nowait((ino, name))
                except trio.WouldBlock:
                    pass

    async def run_invalidator(self) -> None:
        """Deliver entry invalidations from a worker thread, never inside a handler (the
        kernel may wait for a request in flight on that directory)."""
        async for parent, name in self._inval_recv:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBADF):
                    log.debug("invalidate_entry(%d, %r): %s", parent, name, e)

    # -------------------------------------------------------------- requests

    @handler
    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        check_name(name)
        self._room()
        if not is_virtual(parent):  # a root name in a real directory
            make = self.roots[name]
            root = self.node((name, parent), lambda: make(parent))
            return self._looked_up(root, *await self._attr(root))
        d = self._dir(parent)
        if name == b".":
            return self._looked_up(d, *await self._attr(d))
        if name == b"..":  # a virtual parent (the mount asks the real tree for a real one)
            up = self._dir(d.parent)
            return self._looked_up(up, *await self._attr(up))
        child = await d.child(self, name)
        if child is None or child.attr is None:
            return self.table.negative()
        return self._looked_up(child, child.attr)

    @handler
    async def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr, left = await self._attr(self._get(ino))
        return self.table.entry(attr, left)

    @handler
    async def opendir(self, ino: int) -> int:
        d = self._dir(ino)
        fh = next(self._fhs)
        self.dirs[fh] = DirHandle(d)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Like the real readdir (readdirplus: each entry the kernel accepts is a lookup)."""
        h = self.dirs.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for offset, name, ino in ((1, b".", h.node.ino), (2, b"..", h.node.parent)):
            if start_id < offset:
                dot = pyfuse3.EntryAttributes()
                dot.st_ino, dot.st_mode = ino, stat.S_IFDIR  # the kernel ignores the rest
                if not pyfuse3.readdir_reply(token, name, dot, offset):
                    return
                start_id = offset
        after = start_id - DOTS
        if h.done_after is not None and after >= h.done_after:
            return  # the kernel asks once more after the last page: nothing new to send
        while True:
            self._room()
            page = await h.node.page(self, after, READDIR_BATCH)
            for i, (name, cookie, node) in enumerate(page.entries):
                assert node.attr is not None
                if not pyfuse3.readdir_reply(token, name, self.table.entry(node.attr),
                                             cookie + DOTS):
                    for _, _, rest in page.entries[i:]:
                        self.unheld(rest)
                    return
                node.lookups += 1
            after = page.after
            if page.complete:
                h.done_after = after
                return

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def open(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        """Read-only opens of a version; its content is one inode's forever, so the kernel
        may keep its pages (no direct_io, keep_cache), which also lets it be mmapped."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._get(ino)
        if not isinstance(node, VirtualFile):
            raise pyfuse3.FUSEError(errno.EISDIR)
        await node.fetch(self)  # open reads fresh attributes: is it still kept?
        assert node.content is not None
        fh = next(self._fhs)
        node.opened += 1
        self.files[fh] = Reader(node, node.content)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        reader = self.files.get(fh)
        if reader is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.cache.read(reader.content, off, size, reader.state)

    @handler
    async def release(self, fh: int) -> None:
        reader = self.files.pop(fh, None)
        if reader is not None:
            reader.node.opened -= 1
            self.unheld(reader.node)
