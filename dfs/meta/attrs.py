"""Per-inode operations of the namespace: attributes, symlink targets, xattrs, and installing
a new committed version of a file (the namespace half of the 2PC commit point)."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from typing import Any

import lmdb

from dfs.errors import Code, DfsError
from dfs.meta.inode import NAME_MAX, XATTR_VALUE_MAX, Inode, InodeTable
from dfs.meta.record import shown
from dfs.meta.snapshots import is_snap_ino
from dfs.meta.snapview import SnapshotView
from dfs.meta.versions import Version, validate_keep

XATTR_CREATE = 1
XATTR_REPLACE = 2
XATTR_TOTAL_MAX = 256 * 1024
# Names the mount serves itself (user.dfs.version, ...): nobody may store them.
RESERVED_XATTR_PREFIX = b"user.dfs."
#: The exceptions: per-directory policies dfs reads itself, inherited by subdirectories (the
#: nearest ancestor that sets one wins), stored like any xattr but only on directories and only
#: with one of these values (docs/mount.md, "Conflicting writers").
KEEP_VERSIONS_XATTR = b"user.dfs.keep_versions"
POLICY_XATTRS: dict[bytes, frozenset[bytes] | None] = {
    b"user.dfs.on_conflict": frozenset({b"fail", b"overwrite"}),
    KEEP_VERSIONS_XATTR: None,  # a number, 0 to KEEP_VERSIONS_MAX (docs/coordinator.md)
}
#: How many directories an inherited lookup climbs before giving up (a loop would be a bug).
INHERIT_DEPTH_MAX = 4096
SETATTR_FIELDS = frozenset({"mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "size",
                            "kill_suid"})


def killed_privs(mode: int) -> int:
    """mode after a write, truncate or chown by a process without CAP_FSETID, as Linux does
    it: set-user-ID goes, set-group-ID too when group-execute is set (without it the bit
    marks mandatory locking, not privilege, and stays)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def moved_on(what: str, current: int, base_version: int | None, if_version: bool,
             **details: Any) -> DfsError | None:
    """Rule 7 (docs/design.md §5), written once: under if_version a write lands only on the
    version it was based on. The CONFLICT a write of `what`, now at version `current`,
    meets; or None."""
    if not if_version or current == base_version:
        return None
    return DfsError(Code.CONFLICT, f"{what} is at version {current}, the write was based on "
                                   f"version {base_version}", **details)


def check_regular(inode: Inode) -> None:
    """Only a regular file takes a new version (a write, a restore)."""
    if not inode.is_reg:
        raise DfsError(Code.EISDIR if inode.is_dir else Code.EINVAL,
                       f"inode {inode.ino} is not a regular file")


def _xattr_name(name: bytes) -> bytes:
    if not isinstance(name, bytes) or not name or b"\0" in name:
        raise DfsError(Code.EINVAL, f"invalid xattr name {shown(name)}")
    if len(name) > NAME_MAX:
        raise DfsError(Code.ENAMETOOLONG, f"xattr name of {len(name)} bytes (limit {NAME_MAX})")
    return name


def _check_policy(inode: Inode, name: bytes, value: bytes) -> None:
    if not inode.is_dir:
        raise DfsError(Code.EINVAL, f"{name.decode()} is set on directories only")
    allowed = POLICY_XATTRS[name]
    if allowed is None:
        if not value.isdigit():
            raise DfsError(Code.EINVAL, f"{name.decode()} is a number of versions")
        validate_keep(int(value))
        return
    if value not in allowed:
        raise DfsError(Code.EINVAL, f"{name.decode()} is one of "
                                    f"{', '.join(sorted(v.decode() for v in allowed))}")


class AttrOps:
    """Mixed into Namespace; everything here works on one inode."""

    inodes: InodeTable
    snapview: SnapshotView
    keep_versions: int  # the cluster's default (`--keep-versions`), where no directory sets one

    def getattr(self, txn: lmdb.Transaction, ino: int) -> dict[str, Any]:
        if is_snap_ino(ino):
            return self.snapview.getattr(txn, ino)
        return self.inodes.get(txn, ino).attr()

    def _readable(self, txn: lmdb.Transaction, ino: int) -> Inode:
        """The record a read of ino looks at: live, or a snapshot's copy."""
        return self.snapview.inode(txn, ino) if is_snap_ino(ino) else self.inodes.get(txn, ino)

    def readlink(self, txn: lmdb.Transaction, ino: int) -> bytes:
        inode = self._readable(txn, ino)
        if not inode.is_symlink or inode.target is None:
            raise DfsError(Code.EINVAL, f"inode {ino} is not a symlink")
        return inode.target

    def setattr(self, txn: lmdb.Transaction, ino: int, changes: Mapping[str, int], now_ns: int
                ) -> dict[str, Any]:
        """chmod/chown/utimens/truncate. Only truncation to 0 changes content: it installs a
        new, empty version (a non-zero size needs a write transaction). `kill_suid` (after
        any mode change) drops the set-ID bits as a write by an unprivileged process does; it
        reads the mode in this transaction, so a concurrent chmod is never undone."""
        unknown = set(changes) - SETATTR_FIELDS
        if unknown:
            raise DfsError(Code.EINVAL, f"setattr cannot change {sorted(unknown)}")
        inode = self.inodes.get(txn, ino)
        if "size" in changes:
            self._truncate(txn, inode, changes["size"], now_ns)
        if "mode" in changes:
            inode.mode = (inode.mode & ~0o7777) | (changes["mode"] & 0o7777)
        if changes.get("kill_suid"):
            inode.mode = killed_privs(inode.mode)
        for key in ("uid", "gid", "atime_ns", "mtime_ns"):
            if key in changes:
                setattr(inode, key, changes[key])
        inode.ctime_ns = changes.get("ctime_ns", now_ns)
        self.inodes.put(txn, inode)
        return inode.attr()

    def _truncate(self, txn: lmdb.Transaction, inode: Inode, size: int, now_ns: int) -> None:
        if inode.is_dir:
            raise DfsError(Code.EISDIR, f"inode {inode.ino} is a directory")
        if not inode.is_reg:
            raise DfsError(Code.EINVAL, f"inode {inode.ino} is not a regular file")
        if size != 0:
            raise DfsError(Code.EINVAL, "setattr truncates to 0 only; write a new version")
        if inode.size == 0 and inode.blob is None:
            return
        self.inodes.supersede(txn, inode, self.keep_for(txn, inode), now_ns)
        inode.blob = None
        inode.checksum = None
        inode.replicas = []
        inode.size = 0
        inode.version += 1
        inode.mtime_ns = now_ns

    # ------------------------------------------------------------ versions

    def install_version(self, txn: lmdb.Transaction, ino: int, txid: int, *,
                        base_version: int | None, if_version: bool, size: int,
                        checksum: bytes, replicas: list[int], mtime_ns: int | None,
                        now_ns: int) -> dict[str, Any]:
        """Switch a file to the blob `txid` (rule 1: in the decision's transaction).

        Raises (and so writes nothing) if the file is gone or, under if_version, moved on
        since base_version (rule 7). The superseded blob goes to the GC queue.
        """
        inode = self.inodes.find(txn, ino)
        if inode is None:
            raise DfsError(Code.ENOENT, f"file {ino} was deleted during the write")
        check_regular(inode)
        if conflict := moved_on(f"file {ino}", inode.version, base_version, if_version):
            raise conflict
        self.inodes.supersede(txn, inode, self.keep_for(txn, inode), now_ns)
        inode.blob = txid
        inode.size = size
        inode.checksum = checksum
        inode.replicas = list(replicas)
        inode.version += 1
        inode.unwritten = False  # its first content: every client sees it from now on
        inode.mtime_ns = now_ns if mtime_ns is None else mtime_ns
        inode.ctime_ns = now_ns
        self.inodes.put(txn, inode)
        self.inodes.index_blob(txn, inode)
        return inode.attr()

    def keep_for(self, txn: lmdb.Transaction, inode: Inode) -> int:
        """How many old versions this file keeps: `user.dfs.keep_versions` of its directory
        or the nearest ancestor that sets it, else the cluster's `--keep-versions`."""
        if not inode.parent:
            return self.keep_versions
        try:
            value = self.getxattr_inherited(txn, inode.parent, KEEP_VERSIONS_XATTR)
        except DfsError:  # none set, or the first name's directory is gone (hard links)
            return self.keep_versions
        return int(value) if value.isdigit() else self.keep_versions

    def versions(self, txn: lmdb.Transaction, ino: int) -> list[Version]:
        """The file's retained versions, newest first (its current one is its attr)."""
        inode = self._readable(txn, ino)
        if not inode.is_reg:
            raise DfsError(Code.EINVAL, f"inode {ino} is not a regular file")
        return [] if is_snap_ino(ino) else self.inodes.versions.list(txn, ino)

    def version(self, txn: lmdb.Transaction, ino: int, version: int) -> Version:
        """One version of the file to read: a retained one, or the current one."""
        inode = self._readable(txn, ino)
        if not inode.is_reg:
            raise DfsError(Code.EINVAL, f"inode {ino} is not a regular file")
        if version == inode.version:
            return Version(ino, version, inode.blob, inode.size, inode.checksum,
                           list(inode.replicas), inode.mtime_ns)
        found = None if is_snap_ino(ino) else self.inodes.versions.find(txn, ino, version)
        if found is None:
            raise DfsError(Code.ENOENT, f"file {ino} keeps no version {version}")
        return found

    def restore(self, txn: lmdb.Transaction, ino: int, version: int, now_ns: int
                ) -> dict[str, Any]:
        """Version N's content becomes the file's new current version, in this one
        transaction and without copying data: the new version names N's blob, whose copies
        are COMMITTED on N's replicas (docs/coordinator.md, "Version history")."""
        inode = self.inodes.get(txn, ino)
        old = self.version(txn, ino, version)
        check_regular(inode)
        self.inodes.supersede(txn, inode, self.keep_for(txn, inode), now_ns)
        inode.blob = old.blob
        inode.size = old.size
        inode.checksum = old.checksum
        inode.replicas = list(old.replicas)
        inode.version += 1
        inode.mtime_ns = inode.ctime_ns = now_ns
        self.inodes.put(txn, inode)
        self.inodes.index_blob(txn, inode)
        return inode.attr()


    # ------------------------------------------------------------ xattrs

    def getxattr(self, txn: lmdb.Transaction, ino: int, name: bytes) -> bytes:
        value = self._readable(txn, ino).xattrs.get(_xattr_name(name))
        if value is None:
            raise DfsError(Code.ENODATA, f"no xattr {shown(name)}")
        return value

    def getxattr_inherited(self, txn: lmdb.Transaction, ino: int, name: bytes) -> bytes:
        """name's value on ino or its nearest ancestor directory that has it (policy xattrs
        are inherited); ENODATA if none has. ino is a directory (a file has no parent here)."""
        _xattr_name(name)
        if is_snap_ino(ino):  # a snapshot inherits nothing: nothing is written there
            raise DfsError(Code.ENODATA, f"no xattr {shown(name)} in a snapshot")
        for _ in range(INHERIT_DEPTH_MAX):
            inode = self.inodes.get(txn, ino)
            value = inode.xattrs.get(name)
            if value is not None:
                return value
            if not inode.is_dir or inode.parent in (0, ino):
                break
            ino = inode.parent
        raise DfsError(Code.ENODATA, f"no xattr {shown(name)} on {ino} or above")

    def listxattr(self, txn: lmdb.Transaction, ino: int) -> list[bytes]:
        return sorted(self._readable(txn, ino).xattrs)

    def setxattr(self, txn: lmdb.Transaction, ino: int, name: bytes, value: bytes, flags: int,
                 now_ns: int) -> None:
        _xattr_name(name)
        if name.startswith(RESERVED_XATTR_PREFIX) and name not in POLICY_XATTRS:
            raise DfsError(Code.EPERM, f"{shown(name)} is reserved for dfs")
        if flags not in (0, XATTR_CREATE, XATTR_REPLACE):
            raise DfsError(Code.EINVAL, f"bad xattr flags {flags}")
        if not isinstance(value, bytes):
            raise DfsError(Code.EINVAL, "an xattr value must be bytes")
        if len(value) > XATTR_VALUE_MAX:
            raise DfsError(Code.ENOSPC, f"xattr value of {len(value)} bytes "
                                        f"(limit {XATTR_VALUE_MAX})")
        inode = self.inodes.get(txn, ino)
        if name in POLICY_XATTRS:
            _check_policy(inode, name, value)
        exists = name in inode.xattrs
        if flags == XATTR_CREATE and exists:
            raise DfsError(Code.EEXIST, f"xattr {shown(name)} exists")
        if flags == XATTR_REPLACE and not exists:
            raise DfsError(Code.ENODATA, f"no xattr {shown(name)}")
        inode.xattrs[name] = value
        if sum(len(k) + len(v) for k, v in inode.xattrs.items()) > XATTR_TOTAL_MAX:
            raise DfsError(Code.ENOSPC, f"xattrs of inode {ino} over {XATTR_TOTAL_MAX} bytes")
        inode.ctime_ns = now_ns
        self.inodes.put(txn, inode)

    def removexattr(self, txn: lmdb.Transaction, ino: int, name: bytes, now_ns: int) -> None:
        _xattr_name(name)
        if name.startswith(RESERVED_XATTR_PREFIX) and name not in POLICY_XATTRS:
            raise DfsError(Code.EPERM, f"{shown(name)} is reserved for dfs")
        inode = self.inodes.get(txn, ino)
        if inode.xattrs.pop(name, None) is None:
            raise DfsError(Code.ENODATA, f"no xattr {shown(name)}")
        inode.ctime_ns = now_ns
        self.inodes.put(txn, inode)
