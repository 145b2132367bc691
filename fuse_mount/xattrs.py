"""Extended attributes, including dfs's virtual read-only ones (docs/design.md §7).

`user.dfs.version`, `user.dfs.replicas` (node ids, comma-separated) and `user.dfs.checksum`
(xxh3_128, hex) are computed from the committed attributes, `user.dfs.versions` (a file's
versions, newest first, current included: "5,4,3") from its history. They are readable by
name but not listed, so that `cp -a`, `rsync -X` and `tar --xattrs` do not try to copy them onto other files
(where setting them must fail). `user.dfs.calls` on the mount's root counts the cluster calls
this mount has made, by kind ("getattr=3,lookup=12,readdir=10"): what a listing really costs.
`user.dfs.on_conflict` on a directory is a real, stored and listed xattr (conflict.py); setting
or removing it here makes this mount look every directory's policy up again.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pyfuse3

from dfs.client import Client
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from fuse_mount.conflict import ON_CONFLICT, ConflictPolicy
from fuse_mount.handler import handler
from fuse_mount.inodes import InodeTable
from fuse_mount.remote import Remote

CALLS = b"user.dfs.calls"
#: A regular file's versions, newest first, the current one included ("5,4,3"): what its
#: directory's `.versions/NAME/` lists (docs/mount.md, "Versions and snapshots").
VERSIONS = b"user.dfs.versions"
VIRTUAL = frozenset({b"user.dfs.version", b"user.dfs.replicas", b"user.dfs.checksum", CALLS,
                     VERSIONS})
#: Asked by the kernel before every write to a file (to drop file capabilities); dfs has none,
#: so answer here instead of with a round trip per write.
CAPABILITY = b"security.capability"
#: POSIX ACLs: without kernel ACL support (which costs a round trip per create) the kernel would
#: pass them through as opaque values that change nothing, and `cp -a` would then skip its chmod
#: and leave files 0600. Refusing them, as file systems without ACLs do, makes tools use chmod.
ACL_PREFIX = b"system.posix_acl_"
#: SELinux labels are not supported (as on NFSv3): `ls -l` asks for this one for every entry,
#: and answering here saves a round trip each.
UNSUPPORTED = frozenset({CAPABILITY, b"security.selinux"})


def virtual_value(attr: Attr, name: bytes) -> bytes:
    if name == b"user.dfs.version":
        return str(attr.version).encode()
    if name == b"user.dfs.replicas":
        return ",".join(str(r) for r in attr.replicas).encode()
    if name != b"user.dfs.checksum" or attr.checksum is None:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
    return attr.checksum.hex().encode()


class XattrMixin:
    """get/set/list/removexattr for Operations (which provides client, remote and fresh)."""

    client: Client
    remote: Remote
    table: InodeTable
    conflicts: ConflictPolicy

    if TYPE_CHECKING:  # provided by Operations, which mixes this class in
        async def fresh(self, ino: int) -> Attr: ...

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name in UNSUPPORTED or name.startswith(ACL_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == CALLS and inode == pyfuse3.ROOT_INODE:
            calls = sorted(self.remote.calls.items())
            return ",".join(f"{fn}={n}" for fn, n in calls).encode()
        if name == VERSIONS:
            return await self._versions(inode)
        if name in VIRTUAL:
            return virtual_value(await self.fresh(inode), name)
        return await self.remote.call(self.client.getxattr, inode, name)

    async def _versions(self, inode: int) -> bytes:
        try:
            found = await self.remote.call(self.client.history, inode)
        except DfsError as e:
            if e.code is Code.EINVAL:  # not a regular file: it has no versions
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            if e.code is not Code.ENOENT:
                raise
            found = [await self.fresh(inode)]  # removed while open here: its history went too
        return ",".join(str(a.version) for a in found).encode()

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name in VIRTUAL:
            raise pyfuse3.FUSEError(errno.EPERM)
        if name in UNSUPPORTED or name.startswith(ACL_PREFIX):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        try:
            await self.remote.call(self.client.setxattr, inode, name, value, 0)
        finally:
            self.table.stale(inode)  # its ctime moved
            if name == ON_CONFLICT:
                self.conflicts.forget()

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.remote.call(self.client.listxattr, inode)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in VIRTUAL:
            raise pyfuse3.FUSEError(errno.EPERM)
        if name in UNSUPPORTED or name.startswith(ACL_PREFIX):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        try:
            await self.remote.call(self.client.removexattr, inode, name)
        finally:
            self.table.stale(inode)
            if name == ON_CONFLICT:
                self.conflicts.forget()
