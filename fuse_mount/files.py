"""Open files: open, create, read, write, and the commits in flush, fsync and release
(docs/design.md §7). A mixin of Operations, which provides the namespace side.

The kernel page cache is per inode, but here a version is per open (each handle reads the
version it opened, or its own spool), so the kernel must never serve one handle's reads from
pages another content filled. By default every handle gets `direct_io`. With `dfs mount
--page-cache`, pagecache.py decides at open which handles may use the page cache (all readers
of one version, or one writer alone: these can mmap MAP_SHARED) and which get `direct_io`;
before a page-cached open returns, the kernel's pages and size of any other content are
dropped.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

import pyfuse3
import trio

from dfs.client import Client
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from fuse_mount import privs
from fuse_mount.cache import ReadCache
from fuse_mount.closes import ProcReader, Verdict, judge
from fuse_mount.conflict import CONFLICT_ERRNO, ConflictPolicy
from fuse_mount.handler import check_name, handler
from fuse_mount.handles import FileHandle, Services
from fuse_mount.inodes import InodeTable
from fuse_mount.pagecache import Admission, PageCacheRule
from fuse_mount.remote import MaybeDone, Remote
from fuse_mount.sizeback import SizeBack

log = logging.getLogger(__name__)

#: How recent a lookup's attributes must be for open() to use them instead of asking again.
OPEN_FRESH_S = 0.05
#: How often the mount looks whether its unwritten files' leases are due for renewal.
KEEP_TICK_S = 0.5
#: Without --page-cache: direct_io, and no keep_cache (nothing page-cached to keep).
DIRECT = Admission(cached=False, keep=False)


class FilesMixin:
    """File handle requests for Operations (which provides everything declared here)."""

    client: Client
    remote: Remote
    table: InodeTable
    cache: ReadCache
    services: Services
    files: dict[int, FileHandle]
    _fhs: itertools.count[int]
    _recent: dict[int, tuple[float, Attr]]
    pages: PageCacheRule | None  # None: no page cache (every handle direct_io)
    sizeback: SizeBack | None
    conflicts: ConflictPolicy
    closes: ProcReader
    _releasing: dict[int, list[trio.Event]]

    if TYPE_CHECKING:  # provided by Operations, which mixes this class in
        async def fresh(self, ino: int) -> Attr: ...
        def invalidate_later(self, ino: int) -> None: ...
        def _owner(self, parent: int, mode: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]: ...

    def _new_handle(self, ino: int, flags: int, base: Attr) -> tuple[FileHandle, Admission]:
        handle = FileHandle(next(self._fhs), ino, flags, base, self.services)
        if self.pages is None:
            admission = DIRECT
        else:
            admission = self.pages.admit(handle, self.table.handles(ino))
        handle.cached = admission.cached
        self.files[handle.fh] = handle
        self.table.add_handle(handle, base)
        return handle, admission

    def _file_info(self, handle: FileHandle, admission: Admission) -> pyfuse3.FileInfo:
        # A direct_io open keeps the pages the page-cached handles are reading.
        return pyfuse3.FileInfo(
            fh=handle.fh, direct_io=not admission.cached, keep_cache=admission.keep
        )

    async def _show(self, handle: FileHandle, admission: Admission) -> None:
        """Before a page-cached open returns: drop the kernel's pages of another content, and
        its attributes unless they already have this handle's size (the kernel clamps cached
        reads to it). Awaited in a worker thread: the kernel may wait on requests in flight."""
        node = self.table.get(handle.ino)
        stale_size = node is None or node.presented_size != handle.shown_size()
        drop_pages = not admission.keep
        if not (stale_size or drop_pages):
            return
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, handle.ino, not drop_pages)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("invalidate_inode(%d): %s", handle.ino, e)

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        for done in list(self._releasing.get(inode, ())):
            await done.wait()  # close-to-open here too: a commit at release lands first
        recent = self._recent.pop(inode, None)
        if recent is not None and time.monotonic() - recent[0] < OPEN_FRESH_S and \
                not self._knows_newer(recent[1]):
            attr = recent[1]
        else:
            attr = await self.fresh(inode)
        if attr.is_dir():
            raise pyfuse3.FUSEError(errno.EISDIR)
        node = self.table.get(inode)
        presented = None if node is None else node.presented
        handle, admission = self._new_handle(inode, flags, attr)
        self._opened_by(handle, ctx)
        try:
            if flags & os.O_TRUNC and handle.writable:
                await self._drop_privs(handle)
                await handle.truncate(0)
                self._kernel_truncates(handle, admission)
            if admission.cached:
                await self._show(handle, admission)
            elif presented is not None and presented != attr.version:
                self.invalidate_later(inode)  # the kernel's size and mtime are another version's
        except BaseException:
            self._drop_handle(handle)
            raise
        return self._file_info(handle, admission)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        check_name(name)
        mode, gid = self._owner(parent_inode, mode, ctx)
        # A new file is created unwritten (hidden from other clients) when this handle can
        # write its first content; a read-only create makes it empty and visible at once.
        writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        try:
            attr = await self.remote.call(
                self.client.create, parent_inode, name, mode, ctx.uid, gid,
                exclusive=bool(flags & os.O_EXCL), unwritten=writable, done_if=Code.EEXIST,
            )
        except MaybeDone:  # an exclusive create whose reply was lost, found done on retry
            attr = await self.remote.call(self.client.lookup, parent_inode, name,
                                          created_here=True)
        self.table.changed()
        known = self.table.get(attr.ino) is not None  # else the kernel has no pages of it
        handle, admission = self._new_handle(attr.ino, flags, attr)
        self._opened_by(handle, ctx)
        try:
            if attr.unwritten and handle.writable:
                await handle.start_new()
            elif flags & os.O_TRUNC and handle.writable and attr.size:
                await handle.truncate(0)
            if admission.cached and not admission.keep and known:
                await self._show(handle, admission)  # an existing file (create without O_EXCL)
        except BaseException:
            self._drop_handle(handle)
            raise
        return self._file_info(handle, admission), self.table.looked_up(attr, parent_inode, name)

    def _opened_by(self, handle: FileHandle, ctx: pyfuse3.RequestContext) -> None:
        handle.opener = (ctx.pid, ctx.uid)
        if handle.writable:
            handle.writer = self.closes.writer(ctx.pid)

    def _kernel_truncates(self, handle: FileHandle, admission: Admission) -> None:
        """After this O_TRUNC open's reply the kernel sets i_size to 0 (atomic_o_trunc, which
        pyfuse3 always asks for): page-cached holders of the inode get their size stored back."""
        if self.pages is None or self.sizeback is None:
            return
        node = self.table.get(handle.ino)
        if node is not None:
            node.presented_size = None  # what the kernel has now is 0, not what we said
        if not admission.cached and self.pages.holder(handle.ino) is not None:
            handle.size_back = True
            self.sizeback.soon(handle.ino)

    async def _size_back(self, handle: FileHandle) -> None:
        """A request of this handle proves its open's kernel truncate has happened."""
        if handle.size_back and self.sizeback is not None:
            handle.size_back = False
            await self.sizeback.restore(handle.ino)

    def _handle(self, fh: int) -> FileHandle:
        handle = self.files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self._handle(fh).read(off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        await self._size_back(handle)
        await self._drop_privs(handle)
        return await handle.write(off, buf)

    async def _drop_privs(self, handle: FileHandle) -> None:
        """Drop the file's set-ID bits before a write or O_TRUNC by an unprivileged opener,
        as a local file system does (privs.py). A check of the known mode when none are set."""
        node = self.table.get(handle.ino)
        mode = node.attr.mode if node is not None else handle.base.mode
        if not privs.would_drop(mode):
            return
        if handle.fsetid is None:
            handle.fsetid = privs.has_fsetid(*handle.opener)
        if handle.fsetid:
            return
        try:
            attr = await self.remote.call(self.client.setattr, handle.ino, kill_suid=True)
        except DfsError as e:
            node = self.table.get(handle.ino)
            if e.code is not Code.ENOENT or node is None:
                raise
            # Its last name is gone while open: only this host's fstat can still see the mode.
            attr = dataclasses.replace(node.attr, mode=privs.dropped(node.attr.mode))
        self.table.update(attr)

    def _knows_newer(self, attr: Attr) -> bool:
        """Whether this mount has seen a newer version than attr (a commit of its own since
        that lookup): a handle based on attr would be stale from the start."""
        node = self.table.get(attr.ino)
        return node is not None and node.attr.generation == attr.generation and \
            node.attr.version > attr.version

    async def _commit(self, handle: FileHandle) -> None:
        # Only a handle with something to commit needs its directory's policy (conflict.py).
        try:
            conditional = handle.dirty and await self.conflicts.fails(
                self.table.parent_of(handle.ino))
        except DfsError as e:
            log.error("commit of inode %d not tried: its on_conflict policy is unknown: %s",
                      handle.ino, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        try:
            attr = await handle.commit(conditional)
        except DfsError as e:
            if conditional and e.code is Code.CONFLICT and await self._refused(handle, e):
                raise pyfuse3.FUSEError(CONFLICT_ERRNO) from None
            if e.code is Code.ENOENT and await self._gone(handle.ino):
                # Its last name was removed (here or by another client) while it was open:
                # as on a local disk the writes succeed, and nobody can ever read them.
                log.info("inode %d was removed while open; its last writes are dropped",
                         handle.ino)
                return
            log.error("commit of inode %d failed, it keeps its previous version: %s",
                      handle.ino, e)
            raise pyfuse3.FUSEError(errno.ENOSPC if e.code is Code.ENOSPC else errno.EIO) from None
        if attr is not None:
            self.table.update(attr)

    async def _refused(self, handle: FileHandle, e: DfsError) -> bool:
        """A conditional commit lost to another writer: one log line naming the file and both
        versions; the kernel's attributes (this handle's spool size) are dropped. False if
        the file did not move on after all (the transaction was refused for another reason)."""
        try:
            current = str((await self.fresh(handle.ino)).version)
        except DfsError:
            current = "?"
        if current == str(handle.base.version):
            return False
        log.warning("conflict: %s (inode %d): this handle was based on version %d, another "
                    "writer committed version %s since; its writes were refused, the file "
                    "keeps version %s (on_conflict=fail)", self.table.path(handle.ino),
                    handle.ino, handle.base.version, current, current)
        log.debug("conflict of inode %d: %s", handle.ino, e)
        await self._drop_kernel_attrs(handle.ino)
        return True

    async def _drop_kernel_attrs(self, ino: int) -> None:
        """A direct write that extends a file sets the kernel's i_size to the spool's: after a
        refused commit, drop its attributes before close()/fsync() return, so the next stat
        asks (and gets the other writer's size). Attributes only, which takes no inode or page
        lock, so this is safe inside flush and fsync; in a worker thread all the same."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBADF):
                log.debug("invalidate_inode(%d, attr_only): %s", ino, e)

    async def _gone(self, ino: int) -> bool:
        try:
            await self.remote.call(self.client.getattr, ino)
        except DfsError as e:
            return e.code is Code.ENOENT
        return False

    @handler
    async def flush(self, fh: int) -> None:
        """Every close() of every descriptor: commit only at the one its writer meant as the
        end of the write (closes.py)."""
        handle = self._handle(fh)
        await self._size_back(handle)
        if not handle.writable:
            return
        verdict, why = await self._judge(handle)
        if verdict is Verdict.COMMIT:
            await self._commit(handle)
        elif verdict is Verdict.KILLED:
            self._drop_writes(handle, why)
            if self.closes.alive(*self._writer_id(handle)) is not None:
                raise pyfuse3.FUSEError(errno.EIO)  # a child of the writer died holding it
        else:
            log.debug("inode %d: flush is not the end of the write (%s)", handle.ino, why)

    def _writer_id(self, handle: FileHandle) -> tuple[int, int]:
        assert handle.writer is not None
        return handle.writer.pid, handle.writer.start

    async def _judge(self, handle: FileHandle) -> tuple[Verdict, str]:
        writer = handle.writer
        if writer is None:
            return Verdict.WAIT, "the opener could not be read in /proc"
        if writer.killed_by:
            return Verdict.KILLED, f"its writer was killed by signal {writer.killed_by}"
        own = sum(1 for other in self.table.handles(handle.ino)
                  if other is not handle and other.fh in self.files and other.writer is not None
                  and (other.writer.pid, other.writer.start) == self._writer_id(handle))
        # A few dozen small /proc reads: in a worker thread, as the rest of the mount's I/O.
        facts = await trio.to_thread.run_sync(self.closes.facts, writer, handle.ino, own)
        verdict, why = judge(facts)
        if verdict is Verdict.KILLED:
            writer.killed_by = facts.opener.signal if facts.opener is not None and \
                facts.opener.signal else facts.killed_holder
        return verdict, why

    def _drop_writes(self, handle: FileHandle, why: str) -> None:
        """Nothing of this handle is committed; say so once, naming the file. (A file it
        created goes again when the handle does: _unlink_unwritten.)"""
        if handle.dirty:
            node = self.table.get(handle.ino)
            version = handle.base.version if node is None else node.attr.version
            keeps = "it is removed again" if handle.base.unwritten else \
                f"the file keeps version {version}"
            log.warning("dropped the uncommitted writes to %s (inode %d): %s; %s",
                        self.table.path(handle.ino), handle.ino, why, keeps)
        handle.drop_writes()

    async def _unlink_unwritten(self, handle: FileHandle) -> None:
        """Remove the file this handle created if it never got content, and no other handle
        here may still give it some (best effort: a leftover stays hidden from the others)."""
        node = self.table.get(handle.ino)
        if not handle.base.unwritten or node is None or node.name is None or any(
                other is not handle and other.fh in self.files
                for other in self.table.handles(handle.ino)):
            return
        if await self.client.remove_unwritten(node.parent, node.name, handle.ino,
                                              self.remote.retry_for):
            self.table.changed()

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        await self._size_back(handle)
        if handle.writer is not None and handle.writer.killed_by:
            raise pyfuse3.FUSEError(errno.EIO)
        await self._commit(handle)

    @handler
    async def release(self, fh: int) -> None:
        """The last reference to the open file is gone: nothing can write through it any
        more, so what no close committed is the writer's end, unless its writer was killed."""
        handle = self.files.pop(fh, None)
        if handle is None:
            return
        done = trio.Event()
        releasing = self._releasing.setdefault(handle.ino, [])
        releasing.append(done)
        try:
            if handle.writer is not None and handle.writer.killed_by:
                self._drop_writes(handle, f"its writer was killed by signal "
                                          f"{handle.writer.killed_by}")
            elif handle.dirty:
                await self._commit(handle)
        except pyfuse3.FUSEError:
            pass  # already logged; nobody is waiting for a release's answer
        finally:
            await self._unlink_unwritten(handle)  # dropped, or its commit failed: no content
            done.set()
            releasing.remove(done)
            if not releasing:
                del self._releasing[handle.ino]
            self._drop_handle(handle)

    def _drop_handle(self, handle: FileHandle) -> None:
        self.files.pop(handle.fh, None)
        if self.pages is not None:
            self.pages.release(handle)
        handle.close()
        self.table.remove_handle(handle)

    async def keep_unwritten(self) -> None:
        """Renew the leases of the files this mount's open handles created and have not
        committed yet, so no other client takes their names (dfs/unwritten.py). Error policy:
        a renewal that fails is logged; the next one tries again."""
        renewed = trio.current_time()
        while True:
            await trio.sleep(KEEP_TICK_S)  # the lease is known only from a create's reply
            if trio.current_time() - renewed < self.client.unwritten_lease_s / 4:
                continue
            renewed = trio.current_time()
            inos = sorted({h.ino for h in self.files.values() if h.base.unwritten})
            if inos:
                try:
                    await self.client.keep_unwritten(inos)
                except DfsError as e:
                    log.info("renewing %d unwritten file(s) failed: %s", len(inos), e)

    def unfinished(self) -> int:
        """Handles holding writes no close has committed yet."""
        return sum(1 for handle in self.files.values() if handle.dirty)

    async def shutdown(self) -> None:
        """The mount stops: a write still open is unfinished, so nothing of it is committed
        (the file keeps its last finished version); each one dropped is logged."""
        for handle in list(self.files.values()):
            self.files.pop(handle.fh, None)
            self._drop_writes(handle, "the mount stopped before its writer closed it")
            await self._unlink_unwritten(handle)
            handle.close()
        self.files.clear()
        self.cache.close()
