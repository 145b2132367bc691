"""The mount's request handlers with the virtual trees in them (docs/mount.md, "Versions and
snapshots"): each request on a virtual inode, handle or name goes to virtual.py, the rest to
the real tree (operations.py, files.py, xattrs.py) unchanged.

Every change under a virtual tree is EROFS: creating, writing, truncating, removing, renaming
into or out of it, linking, chmod/chown/utimes, xattrs. `D/.snapshots` is no virtual tree of
the mount's: the coordinator serves it under its own (encoded) inode numbers and refuses every
change with EROFS; the mount refuses an open for writing and a setattr there itself, at once
rather than at close. (With the kernel's permission checks, a
process without CAP_DAC_OVERRIDE meets the missing write bits first and gets EACCES.)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import pyfuse3
import trio

from dfs.meta.snapshots import is_snap_ino
from fuse_mount.operations import Operations
from fuse_mount.versions import VERSIONS, VersionsDir
from fuse_mount.virtual import VirtualTree, is_virtual

#: Opening a file with any of these changes it (or means to).
WRITING = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND

#: The names that open a virtual tree in every directory, and its top node kind.
ROOTS = {VERSIONS: VersionsDir}


def _refuse() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class MountOperations(Operations):
    """Operations plus the virtual trees: a dispatch per handler, nothing else."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.virtual = VirtualTree(self.client, self.remote, self.cache, self.table, self._fhs,
                                   dict(ROOTS))

    async def run_invalidator(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(super().run_invalidator)
            nursery.start_soon(self.virtual.run_invalidator)

    def _claims(self, parent: int, name: bytes) -> bool:
        """Whether parent/name is in a virtual tree (or is the root of one)."""
        return is_virtual(parent) or name in self.virtual.roots

    # --------------------------------------------------------------- lookups

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if is_virtual(parent_inode) and name == b"..":
            up = self.virtual.parent_of(parent_inode)
            if not is_virtual(up):  # D/.versions/.. is D, a real directory
                return await super().lookup(up, b".", ctx)
        if self._claims(parent_inode, name):
            return await self.virtual.lookup(parent_inode, name)
        return await super().lookup(parent_inode, name, ctx)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        real = []
        for ino, count in inode_list:
            if is_virtual(ino):
                self.virtual.forget(ino, count)
            else:
                real.append((ino, count))
        if real:
            await super().forget(real)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_virtual(inode):
            return await self.virtual.getattr(inode)
        return await super().getattr(inode, ctx)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if is_virtual(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await super().readlink(inode, ctx)

    # ------------------------------------------------------ changes: refused

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_virtual(inode) or is_snap_ino(inode):
            raise _refuse()
        return await super().setattr(inode, attr, fields, fh, ctx)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            return await super().mkdir(parent_inode, name, mode, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            return await super().mknod(parent_inode, name, mode, rdev, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            return await super().symlink(parent_inode, name, target, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_virtual(inode) or self._claims(new_parent_inode, new_name):
            raise _refuse()
        try:
            return await super().link(inode, new_parent_inode, new_name, ctx)
        finally:
            self.virtual.changed(new_parent_inode, new_name)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            await super().unlink(parent_inode, name, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            await super().rmdir(parent_inode, name, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if self._claims(parent_inode_old, name_old) or self._claims(parent_inode_new, name_new):
            raise _refuse()
        try:
            await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                                 ctx)
        finally:
            self.virtual.changed(parent_inode_old, name_old)
            self.virtual.changed(parent_inode_new, name_new)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self._claims(parent_inode, name):
            raise _refuse()
        try:
            return await super().create(parent_inode, name, mode, flags, ctx)
        finally:
            self.virtual.changed(parent_inode, name)

    # ---------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_virtual(inode):
            return await self.virtual.opendir(inode)
        return await super().opendir(inode, ctx)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh in self.virtual.dirs:
            return await self.virtual.readdir(fh, start_id, token)
        return await super().readdir(fh, start_id, token)

    async def releasedir(self, fh: int) -> None:
        if fh in self.virtual.dirs:
            return await self.virtual.releasedir(fh)
        return await super().releasedir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if fh not in self.virtual.dirs:
            await super().fsyncdir(fh, datasync)

    # ---------------------------------------------------------------- files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if is_virtual(inode):
            return await self.virtual.open(inode, flags)
        if is_snap_ino(inode) and flags & WRITING:  # a snapshot's file: the coordinator's
            raise _refuse()  # numbers, read-only there; refused here, not at close
        return await super().open(inode, flags, ctx)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        if fh in self.virtual.files:
            return await self.virtual.read(fh, off, size)
        return await super().read(fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh in self.virtual.files:  # opened read-only: the kernel never sends this
            raise pyfuse3.FUSEError(errno.EBADF)
        return await super().write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        if fh not in self.virtual.files:
            await super().flush(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh not in self.virtual.files:
            await super().fsync(fh, datasync)

    async def release(self, fh: int) -> None:
        if fh in self.virtual.files:
            return await self.virtual.release(fh)
        return await super().release(fh)

    # --------------------------------------------------------------- xattrs

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if is_virtual(inode):  # none, and no round trip for those `ls -l` asks
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await super().getxattr(inode, name, ctx)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if is_virtual(inode):
            return []
        return await super().listxattr(inode, ctx)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if is_virtual(inode):
            raise _refuse()
        await super().setxattr(inode, name, value, ctx)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if is_virtual(inode):
            raise _refuse()
        await super().removexattr(inode, name, ctx)
