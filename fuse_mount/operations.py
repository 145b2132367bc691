"""The pyfuse3 request handlers: POSIX calls onto dfs (docs/design.md §7).

Rules every handler keeps:
- Errors are errno (`FUSEError`), never a traceback: `DfsError.errno` maps the cluster's codes;
  anything unexpected is logged with its traceback and becomes EIO.
- Nothing blocks the trio thread: cluster calls are async, bulk disk I/O runs in worker
  threads, and kernel cache invalidations go through a worker task, never from a handler.
- The kernel caches attributes and entries for `attr_timeout` (never 0); that bounds how long
  another client's change can go unseen. Opening a file always reads fresh attributes
  (close-to-open consistency). The kernel page cache is per inode but here a version is per
  open, so file data bypasses it (direct_io) and each handle reads exactly the version it
  opened, or its own spool; with `--page-cache`, pagecache.py lets handles of one content use
  it (the others get direct_io).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyfuse3
import trio

from dfs.client import Client
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from dfs.metrics.mount import MountMetrics
from fuse_mount.cache import ReadCache
from fuse_mount.closes import ProcReader
from fuse_mount.conflict import OVERWRITE, ConflictPolicy
from fuse_mount.files import FilesMixin
from fuse_mount.handler import NAME_MAX, check_name, handler
from fuse_mount.handles import FileHandle, Services
from fuse_mount.inodes import InodeTable
from fuse_mount.listing import REVALIDATE_BATCH, Listings
from fuse_mount.pagecache import PageCacheRule
from fuse_mount.remote import MaybeDone, Remote
from fuse_mount.sizeback import SizeBack
from fuse_mount.xattrs import XattrMixin

log = logging.getLogger(__name__)

READDIR_BATCH = 512
DOTS = 2  # readdir offsets 1 and 2 are "." and ".."
READDIR_BUFFER_AGE = 0.5


@dataclass
class DirHandle:
    ino: int
    buffer: list[tuple[bytes, int, Attr]] = field(default_factory=list)
    buffer_after: int = -1
    buffer_time: float = 0.0
    buffer_epoch: int = -1


class Operations(FilesMixin, XattrMixin, pyfuse3.Operations):
    """dfs as a pyfuse3 file system."""

    supports_dot_lookup = False
    # The kernel's writeback cache trusts its own size and mtime of a cached regular file over
    # the file system's, so another client's commit would stay invisible: keep it off.
    enable_writeback_cache = False
    metrics: MountMetrics | None = None  # `dfs mount --metrics`: set by fuse_mount/main.py

    def __init__(
        self,
        client: Client,
        cache: ReadCache,
        spool_dir: Path,
        *,
        attr_timeout: float = 1.0,
        retry_for: float = 30.0,
        page_cache: bool = False,
        on_conflict: str = OVERWRITE,
        mountpoint: Path | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.remote = Remote(retry_for)
        self.table = InodeTable(attr_timeout)
        self.listings = Listings(attr_timeout)
        self.cache = cache
        self.services = Services(client, self.remote, cache, spool_dir)
        self.conflicts = ConflictPolicy(on_conflict, client, self.remote, attr_timeout)
        self.closes = ProcReader(mountpoint)  # which close commits (closes.py)
        self._releasing: dict[int, list[trio.Event]] = {}  # commits at release, by inode
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._fhs = itertools.count(1)
        self._recent: dict[int, tuple[float, Attr]] = {}
        # `dfs mount --page-cache` only: without it every open is direct_io, as before.
        self.pages: PageCacheRule | None = PageCacheRule() if page_cache else None
        self.sizeback = SizeBack(self.pages) if self.pages is not None else None
        self._inval_send, self._inval_recv = trio.open_memory_channel[int](4096)
        self.initialized = trio.Event()

    def init(self) -> None:
        """FUSE_INIT arrived (its reply goes out when this returns)."""
        self.initialized.set()

    # ------------------------------------------------------------- plumbing

    async def run_invalidator(self) -> None:
        """Deliver kernel cache invalidations from a worker thread, outside every handler:
        the kernel may wait for a request in flight before it can honour one."""
        async for ino in self._inval_recv:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBADF):
                    log.debug("invalidate_inode(%d): %s", ino, e)

    def invalidate_later(self, ino: int) -> None:
        try:
            self._inval_send.send_nowait(ino)
        except trio.WouldBlock:
            pass  # the attribute timeout bounds the staleness anyway

    async def fresh(self, ino: int) -> Attr:
        """Attributes straight from the coordinator; an open-but-deleted file keeps its last."""
        try:
            attr = await self.remote.call(self.client.getattr, ino)
        except DfsError as e:
            node = self.table.get(ino)
            if e.code is Code.ENOENT and node is not None and (node.lookups or node.handles):
                return replace(node.attr, nlink=0)
            raise
        self.table.update(attr)
        return attr

    def _remember(self, attr: Attr) -> None:
        self._recent[attr.ino] = (time.monotonic(), attr)
        if len(self._recent) > 1024:
            self._recent.clear()

    # --------------------------------------------------------------- lookups

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self.table.looked_up(await self.fresh(parent_inode))
        if name == b"..":
            return self.table.looked_up(await self.fresh(self.table.parent_of(parent_inode)))
        check_name(name)
        listed = self.listings.fresh(parent_inode, name, self.table.epoch)
        if listed is not None:
            entry = self.table.looked_up_again(*listed)
            if entry is not None:
                return entry
        attr = await self._relisted(parent_inode, name)
        if attr is None:
            try:
                attr = await self.remote.call(self.client.lookup, parent_inode, name)
            except DfsError as e:
                if e.code is Code.ENOENT:
                    return self.table.negative()
                raise
        self._remember(attr)
        return self.table.looked_up(attr, parent_inode, name)

    async def _relisted(self, parent: int, name: bytes) -> Attr | None:
        """A name listed here before, looked up again after its timeout (`ls -l` of a big
        directory): re-read its directory page in one round trip, which renews the names
        after it too (listing.py). None if it was not listed, or is not on that page."""
        cookie = self.listings.cookie(parent, name)
        if cookie is None:
            return None
        epoch, when = self.table.epoch, time.monotonic()
        batch = await self.remote.call(self.client.readdir, parent, cookie - 1, REVALIDATE_BATCH)
        found, found_cookie = None, cookie
        renew = self.table.epoch == epoch  # else a change here raced the read: renew nothing
        for entry_name, entry_cookie, attr in batch:
            if entry_name == name:
                found, found_cookie = attr, entry_cookie
            elif renew and self.table.get(attr.ino) is not None:  # only what the kernel holds
                self.table.update(attr)
                self.listings.listed(parent, entry_name, entry_cookie, attr.ino, epoch, when)
        if found is None:
            self.listings.forget(parent, name)
        else:
            self.listings.listed(parent, name, found_cookie, found.ino, epoch, when)
        return found

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino, count in inode_list:
                self.table.forget(ino, count)
                if self.table.get(ino) is None:
                    self._recent.pop(ino, None)
                    if self.pages is not None:
                        self.pages.forget(ino)
        except Exception:  # forget must never raise
            log.exception("forget failed")

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        cached = self.table.cached(inode)
        if cached is not None:
            return self.table.entry(*cached)
        return self.table.entry(await self.fresh(inode))

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table.get(inode)
        if node is not None and node.attr.target is not None:
            return node.attr.target
        return await self.remote.call(self.client.readlink, inode)

    # ------------------------------------------------------------ attributes

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        handle = self.files.get(fh) if fh is not None else None
        if fields.update_size:
            await self._truncate(inode, attr.st_size, handle)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            for h in self.table.handles(inode):
                if h.dirty:  # the commit at close must not overwrite the time set now
                    h.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        if changes:
            try:
                new = await self.remote.call(self.client.setattr, inode, **changes)
            except DfsError as e:
                node = self.table.get(inode)
                if (e.code is not Code.ENOENT or node is None or not node.handles
                        or self.pages is None):
                    raise
                # Its last name is gone while open (the kernel drops set-ID bits this way
                # before a cached write): only this host's fstat can still see the change.
                new = replace(node.attr, nlink=0, **changes)
            self.table.update(new)
        else:
            new = await self.fresh(inode)
        return self.table.entry(new)

    async def _truncate(self, ino: int, size: int, handle: FileHandle | None) -> None:
        """ftruncate changes the handle's spool; truncate(2) changes the spools of this host's
        open writers if there are any, else commits a version of its own."""
        if handle is not None and handle.writable:
            await handle.truncate(size)
            return
        writers = [h for h in self.table.handles(ino) if h.writable]
        if writers:
            for h in writers:
                await h.truncate(size)
            return
        if size == 0:
            self.table.update(await self.remote.call(self.client.setattr, ino, size=0))
            return
        temp = FileHandle(0, ino, os.O_WRONLY, await self.fresh(ino), self.services)
        try:
            await temp.truncate(size)
            attr = await temp.commit()
            if attr is not None:
                self.table.update(attr)
        finally:
            temp.close()

    # -------------------------------------------------------------- creation

    def _owner(self, parent: int, mode: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """(mode, gid) of a new entry: the umask applies, and a set-group-ID directory passes
        on its group (and, to subdirectories, the bit itself)."""
        mode &= ~ctx.umask
        gid = ctx.gid
        node = self.table.get(parent)
        if node is not None and node.attr.mode & stat.S_ISGID:
            gid = node.attr.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return mode, gid

    async def _made(self, parent: int, name: bytes, make: Awaitable[Attr]) -> Attr:
        try:
            attr = await make
        except MaybeDone:
            attr = await self.remote.call(self.client.lookup, parent, name)
        self.table.changed()
        return attr

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        check_name(name)
        mode, gid = self._owner(parent_inode, mode, ctx)
        make = self.remote.call(
            self.client.mkdir, parent_inode, name, mode, ctx.uid, gid, done_if=Code.EEXIST
        )
        return self.table.looked_up(await self._made(parent_inode, name, make), parent_inode,
                                    name)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """A regular file, or a FIFO, socket (bind) or device node: metadata only, the kernel
        opens those itself and their data never reaches dfs."""
        check_name(name)
        mode, gid = self._owner(parent_inode, mode, ctx)
        if stat.S_ISREG(mode):
            make = self.remote.call(
                self.client.create, parent_inode, name, mode, ctx.uid, gid, done_if=Code.EEXIST
            )
        else:
            make = self.remote.call(
                self.client.mknod, parent_inode, name, mode, ctx.uid, gid, rdev,
                done_if=Code.EEXIST,
            )
        return self.table.looked_up(await self._made(parent_inode, name, make), parent_inode,
                                    name)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        check_name(name)
        _, gid = self._owner(parent_inode, 0, ctx)
        make = self.remote.call(
            self.client.symlink, parent_inode, name, target, ctx.uid, gid, done_if=Code.EEXIST
        )
        return self.table.looked_up(await self._made(parent_inode, name, make), parent_inode,
                                    name)

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        check_name(new_name)
        make = self.remote.call(
            self.client.link, inode, new_parent_inode, new_name, done_if=Code.EEXIST
        )
        return self.table.looked_up(await self._made(new_parent_inode, new_name, make),
                                    new_parent_inode, new_name)

    # --------------------------------------------------------------- removal

    async def _open_victim(self, parent: int, name: bytes) -> int | None:
        """The inode behind name if this host has it open (its content must stay readable)."""
        if not self.files:
            return None
        try:
            attr = await self.remote.call(self.client.lookup, parent, name)
        except DfsError:
            return None
        return attr.ino if self.table.handles(attr.ino) else None

    def _orphaned(self, ino: int | None) -> None:
        if ino is not None:
            for h in self.table.handles(ino):
                h.keep_readable()

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        check_name(name)
        victim = await self._open_victim(parent_inode, name)
        try:
            await self.remote.call(self.client.unlink, parent_inode, name, done_if=Code.ENOENT)
        except MaybeDone:
            pass
        finally:
            self.table.changed()
        self._orphaned(victim)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        check_name(name)
        try:
            await self.remote.call(self.client.rmdir, parent_inode, name, done_if=Code.ENOENT)
        except MaybeDone:
            pass
        finally:
            self.table.changed()

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        check_name(name_old)
        check_name(name_new)
        victim = None
        if not flags & pyfuse3.RENAME_EXCHANGE:
            victim = await self._open_victim(parent_inode_new, name_new)
        try:
            await self.remote.call(
                self.client.rename, parent_inode_old, name_old, parent_inode_new, name_new,
                flags, done_if=Code.ENOENT,
            )
        except MaybeDone:
            pass
        finally:
            self.table.changed()
            self.conflicts.forget()  # a directory that moved may inherit another policy
        self._orphaned(victim)

    # ------------------------------------------------------------ directories

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = next(self._fhs)
        self.dirs[fh] = DirHandle(inode)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries after offset start_id; every entry the kernel accepts is a lookup
        (readdirplus). Offsets 1 and 2 follow "." and ".."; the coordinator's cookie c is
        offset c + 2. Cookies are stable, so concurrent creates and deletes skip nothing."""
        d = self.dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for offset, name, ino in ((1, b".", d.ino), (2, b"..", self.table.parent_of(d.ino))):
            if start_id < offset:
                dot = pyfuse3.EntryAttributes()
                dot.st_ino, dot.st_mode = ino, stat.S_IFDIR  # the kernel ignores the rest
                if not pyfuse3.readdir_reply(token, name, dot, offset):
                    return
                start_id = offset
        after = start_id - DOTS
        while True:
            if d.buffer and d.buffer_after == after and (
                time.monotonic() - d.buffer_time < READDIR_BUFFER_AGE
            ):
                batch, complete = d.buffer, False
            else:
                d.buffer_epoch, d.buffer_time = self.table.epoch, time.monotonic()
                batch = await self.remote.call(self.client.readdir, d.ino, after, READDIR_BATCH)
                complete = len(batch) < READDIR_BATCH
            d.buffer = []
            for i, (name, cookie, attr) in enumerate(batch):
                if not pyfuse3.readdir_reply(token, name, self.table.entry(attr), cookie + DOTS):
                    d.buffer, d.buffer_after = batch[i:], after
                    return
                self.table.looked_up(attr, d.ino, name)
                self.listings.listed(d.ino, name, cookie, attr.ino, d.buffer_epoch,
                                     d.buffer_time)
                after = cookie
            if complete or not batch:
                return

    @handler
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Namespace changes are durable when the coordinator answers: nothing to do."""

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The cluster's space as files can use it (the coordinator divides by R already)."""
        info = await self.remote.call(self.client.statfs)
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = int(info.get("capacity", 0)) // st.f_frsize
        st.f_bfree = st.f_bavail = int(info.get("free", 0)) // st.f_frsize
        free_inodes = 1 << 32
        st.f_files = int(info.get("files", 0)) + free_inodes
        st.f_ffree = st.f_favail = free_inodes
        st.f_namemax = NAME_MAX
        return st
