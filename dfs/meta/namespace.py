"""The namespace: inodes, directory entries and readdir cookies (docs/design.md §3, §6).

Every method takes the caller's LMDB write (or read) transaction and does the whole POSIX
operation in it, so a namespace operation is atomic by being one transaction, and the 2PC
decision can switch an inode in the same transaction that records the decision.
Times come in as arguments: the store has no clock, which keeps it deterministic under test.
"""

from __future__ import annotations

import stat
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.attrs import AttrOps
from dfs.meta.cluster import ClusterMeta
from dfs.meta.entries import Entry, EntryTable
from dfs.meta.gcqueue import GcQueue
from dfs.meta.inode import (
    DEVICE_KINDS,
    RDEV_MAX,
    ROOT_INO,
    SPECIAL_KINDS,
    SYMLINK_MAX,
    Inode,
    InodeTable,
    validate_name,
    validate_new_name,
)
from dfs.meta.record import shown
from dfs.meta.snapshots import SNAPSHOTS_DIR, is_snap_ino
from dfs.meta.snapview import SnapshotView

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
PATH_MAX = 4096
READDIR_MAX = 1024

Attr = dict[str, Any]


class Namespace(AttrOps):
    """Directory operations; attribute, xattr and version operations come from AttrOps."""

    def __init__(self, db: Database, meta: ClusterMeta, gc: GcQueue, gc_grace_ns: int,
                 keep_versions: int = 0) -> None:
        self.inodes = InodeTable(db, meta, gc, gc_grace_ns)
        self.entries = EntryTable(db)
        self.keep_versions = keep_versions
        self.snapshots = self.inodes.snapshots
        self.snapview = SnapshotView(self.inodes, self.snapshots)

    def init_root(self, txn: lmdb.Transaction, now_ns: int) -> bool:
        """Create the root directory (ino 1, mode 0o40755) unless it exists."""
        if self.inodes.find(txn, ROOT_INO) is not None:
            return False
        self.inodes.put(txn, Inode(ino=ROOT_INO, mode=stat.S_IFDIR | 0o755, nlink=2,
                                   atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                                   parent=ROOT_INO))
        return True

    # ------------------------------------------------------------ lookups

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> Attr:
        if is_snap_ino(parent):
            return self.snapview.lookup(txn, parent, name)
        directory = self.inodes.get_dir(txn, parent)
        if name == SNAPSHOTS_DIR:  # reachable by name, never listed (dfs/meta/snapview.py)
            return self.snapview.listing_attr(directory)
        return self.inodes.get(txn, self._entry(txn, directory, name).ino).attr()

    def resolve(self, txn: lmdb.Transaction, path: str) -> Attr:
        """Walk an absolute path from the root. Symlinks are not followed (that is lstat's
        answer; a client follows them itself, as the kernel does for a mount)."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise DfsError(Code.EINVAL, f"not an absolute path: {path!r}")
        raw = path.encode("utf-8", "surrogateescape")
        if len(raw) > PATH_MAX:
            raise DfsError(Code.ENAMETOOLONG, f"path of {len(raw)} bytes (limit {PATH_MAX})")
        attr = self.inodes.get(txn, ROOT_INO).attr()
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if not stat.S_ISDIR(attr["mode"]):
                raise DfsError(Code.ENOTDIR, f"{path}: a component is not a directory")
            if part == b"..":
                attr = self._up(txn, attr)
                continue
            try:
                attr = self.lookup(txn, attr["ino"], validate_name(part))
            except DfsError as e:
                if e.code is Code.ENOENT:
                    raise DfsError(Code.ENOENT, f"{path}: no such file or directory") from None
                raise
        if raw.endswith(b"/") and not stat.S_ISDIR(attr["mode"]):
            raise DfsError(Code.ENOTDIR, f"{path}: not a directory")
        return attr

    def _up(self, txn: lmdb.Transaction, attr: Attr) -> Attr:
        """'..' of a directory: its parent (inside a snapshot, the snapshot's)."""
        if is_snap_ino(attr["ino"]):
            return self.getattr(txn, self.snapview.parent(txn, attr["ino"]))
        return self.inodes.get(txn, self.inodes.get(txn, attr["ino"]).parent or ROOT_INO).attr()

    def readdir(self, txn: lmdb.Transaction, ino: int, after: int, limit: int
                ) -> list[list[Any]]:
        """[[name, cookie, attr], ...] with cookie > after, in cookie order (readdirplus)."""
        limit = max(1, min(limit, READDIR_MAX))
        if is_snap_ino(ino):
            return self.snapview.readdir(txn, ino, after, limit)
        self.inodes.get_dir(txn, ino)
        out: list[list[Any]] = []
        for entry in self.entries.list(txn, ino, after, limit):
            child = self.inodes.find(txn, entry.ino)
            if child is not None:
                out.append([entry.name, entry.cookie, child.attr()])
        return out

    # ------------------------------------------------------------ creation

    def mkdir(self, txn: lmdb.Transaction, parent: int, name: bytes, mode: int, uid: int,
              gid: int, now_ns: int) -> Attr:
        directory = self._vacant(txn, parent, name)
        child = self.inodes.allocate(txn, stat.S_IFDIR | (mode & 0o7777), uid, gid, now_ns,
                                     nlink=2, parent=parent)
        self.entries.add(txn, directory, name, child.ino)
        directory.nlink += 1
        self._touch(directory, now_ns)
        self.inodes.put(txn, child)
        self.inodes.put(txn, directory)
        return child.attr()

    def create(self, txn: lmdb.Transaction, parent: int, name: bytes, mode: int, uid: int,
               gid: int, now_ns: int, exclusive: bool = True, unwritten: bool = False) -> Attr:
        """An empty regular file (version 0); without `exclusive` an existing file is opened.
        `unwritten`: a new file stays hidden from other clients until its first commit."""
        kind = stat.S_IFMT(mode)
        if kind not in (0, stat.S_IFREG):
            raise DfsError(Code.EINVAL, "create makes regular files only")
        directory = self.inodes.get_dir(txn, parent)
        validate_new_name(name)
        existing = self.entries.find(txn, parent, name)
        if existing is not None:
            if exclusive:
                raise DfsError(Code.EEXIST, f"{shown(name)} exists")
            inode = self.inodes.get(txn, existing.ino)
            if inode.is_dir:
                raise DfsError(Code.EISDIR, f"{shown(name)} is a directory")
            return inode.attr()
        child = self.inodes.allocate(txn, stat.S_IFREG | (mode & 0o7777), uid, gid, now_ns,
                                     parent=parent, unwritten=unwritten)
        return self._link_new(txn, directory, name, child, now_ns)

    def symlink(self, txn: lmdb.Transaction, parent: int, name: bytes, target: bytes, uid: int,
                gid: int, now_ns: int) -> Attr:
        if not isinstance(target, bytes) or not target or b"\0" in target:
            raise DfsError(Code.ENOENT if target == b"" else Code.EINVAL, "bad symlink target")
        if len(target) > SYMLINK_MAX:
            raise DfsError(Code.ENAMETOOLONG, f"symlink target over {SYMLINK_MAX} bytes")
        directory = self._vacant(txn, parent, name)
        child = self.inodes.allocate(txn, stat.S_IFLNK | 0o777, uid, gid, now_ns,
                                     target=target, size=len(target))
        return self._link_new(txn, directory, name, child, now_ns)

    def mknod(self, txn: lmdb.Transaction, parent: int, name: bytes, mode: int, rdev: int,
              uid: int, gid: int, now_ns: int) -> Attr:
        """A FIFO, socket, or character or block device: metadata only (the kernel serves
        their data). `rdev` is kept for devices and must be 0 for the others."""
        kind = stat.S_IFMT(mode)
        if kind not in SPECIAL_KINDS:
            raise DfsError(Code.EINVAL, f"mknod makes FIFOs, sockets and devices, not mode "
                                        f"{mode:o} (create makes files, mkdir directories)")
        if not 0 <= rdev <= RDEV_MAX:
            raise DfsError(Code.EINVAL, f"device number {rdev} out of range")
        if rdev and kind not in DEVICE_KINDS:
            raise DfsError(Code.EINVAL, "only character and block devices have a device number")
        directory = self._vacant(txn, parent, name)
        child = self.inodes.allocate(txn, kind | (mode & 0o7777), uid, gid, now_ns, rdev=rdev)
        return self._link_new(txn, directory, name, child, now_ns)

    def link(self, txn: lmdb.Transaction, ino: int, parent: int, name: bytes, now_ns: int
             ) -> Attr:
        inode = self.inodes.get(txn, ino)
        if inode.is_dir:
            raise DfsError(Code.EPERM, "cannot hard-link a directory")
        directory = self._vacant(txn, parent, name)
        inode.nlink += 1
        inode.ctime_ns = now_ns
        return self._link_new(txn, directory, name, inode, now_ns)

    # ------------------------------------------------------------ removal

    def unlink(self, txn: lmdb.Transaction, parent: int, name: bytes, now_ns: int) -> None:
        directory = self.inodes.get_dir(txn, parent)
        entry = self._entry(txn, directory, name)
        inode = self.inodes.get(txn, entry.ino)
        if inode.is_dir:
            raise DfsError(Code.EISDIR, f"{shown(name)} is a directory")
        self.entries.remove(txn, entry)
        self.inodes.drop_link(txn, inode, now_ns)
        self._touch(directory, now_ns)
        self.inodes.put(txn, directory)

    def rmdir(self, txn: lmdb.Transaction, parent: int, name: bytes, now_ns: int) -> None:
        directory = self.inodes.get_dir(txn, parent)
        entry = self._entry(txn, directory, name)
        inode = self.inodes.get(txn, entry.ino)
        if not inode.is_dir:
            raise DfsError(Code.ENOTDIR, f"{shown(name)} is not a directory")
        if not self.entries.is_empty(txn, inode.ino):
            raise DfsError(Code.ENOTEMPTY, f"{shown(name)} is not empty")
        self.entries.remove(txn, entry)
        self.inodes.delete_dir(txn, inode)
        directory.nlink -= 1
        self._touch(directory, now_ns)
        self.inodes.put(txn, directory)

    # ------------------------------------------------------------ rename

    def rename(self, txn: lmdb.Transaction, parent: int, name: bytes, new_parent: int,
               new_name: bytes, flags: int, now_ns: int) -> None:
        """POSIX rename(2)/renameat2(2): replaces a target atomically, or with
        RENAME_NOREPLACE refuses to, or with RENAME_EXCHANGE swaps the two names."""
        validate_name(name)
        validate_new_name(new_name)
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise DfsError(Code.EINVAL, f"unsupported rename flags {flags}")
        src_dir = self.inodes.get_dir(txn, parent)
        dst_dir = src_dir if new_parent == parent else self.inodes.get_dir(txn, new_parent)
        src_entry = self._entry(txn, src_dir, name)
        dst_entry = self.entries.find(txn, new_parent, new_name)
        if flags == RENAME_EXCHANGE and dst_entry is None:
            raise DfsError(Code.ENOENT, f"{shown(new_name)} does not exist to exchange with")
        if flags == RENAME_NOREPLACE and dst_entry is not None:
            raise DfsError(Code.EEXIST, f"{shown(new_name)} exists")
        if dst_entry is not None and dst_entry.ino == src_entry.ino:
            return  # both names already are the same file: POSIX says do nothing
        src = self.inodes.get(txn, src_entry.ino)
        if src.is_dir and new_parent != parent:
            self._check_not_inside(txn, new_parent, src)

        if flags == RENAME_EXCHANGE:
            assert dst_entry is not None
            dst = self.inodes.get(txn, dst_entry.ino)
            if dst.is_dir and new_parent != parent:
                self._check_not_inside(txn, parent, dst)
            self.entries.repoint(txn, src_entry, dst.ino)
            self.entries.repoint(txn, dst_entry, src.ino)
            if new_parent != parent:
                self._reparent(src, src_dir, dst_dir)
                self._reparent(dst, dst_dir, src_dir)
            dst.ctime_ns = now_ns
            self.inodes.put(txn, dst)
        else:
            if dst_entry is not None:
                self._replace_target(txn, src, dst_dir, dst_entry, now_ns)
            self.entries.remove(txn, src_entry)
            self.entries.add(txn, dst_dir, new_name, src.ino)
            if new_parent != parent:
                self._reparent(src, src_dir, dst_dir)
        src.ctime_ns = now_ns
        self.inodes.put(txn, src)
        self._touch(src_dir, now_ns)
        self.inodes.put(txn, src_dir)
        if dst_dir is not src_dir:
            self._touch(dst_dir, now_ns)
            self.inodes.put(txn, dst_dir)

    def _replace_target(self, txn: lmdb.Transaction, src: Inode, dst_dir: Inode,
                        dst_entry: Entry, now_ns: int) -> None:
        dst = self.inodes.get(txn, dst_entry.ino)
        if src.is_dir and not dst.is_dir:
            raise DfsError(Code.ENOTDIR, f"{shown(dst_entry.name)} is not a directory")
        if not src.is_dir and dst.is_dir:
            raise DfsError(Code.EISDIR, f"{shown(dst_entry.name)} is a directory")
        if dst.is_dir and not self.entries.is_empty(txn, dst.ino):
            raise DfsError(Code.ENOTEMPTY, f"{shown(dst_entry.name)} is not empty")
        self.entries.remove(txn, dst_entry)
        if dst.is_dir:
            self.inodes.delete_dir(txn, dst)
            dst_dir.nlink -= 1
        else:
            self.inodes.drop_link(txn, dst, now_ns)

    def _check_not_inside(self, txn: lmdb.Transaction, target_dir: int, moved: Inode) -> None:
        """EINVAL if target_dir is `moved` or below it: a directory can't enter its subtree."""
        ino = target_dir
        while True:
            if ino == moved.ino:
                raise DfsError(Code.EINVAL, "cannot move a directory into its own subtree")
            if ino == ROOT_INO:
                return
            ino = self.inodes.get(txn, ino).parent or ROOT_INO

    @staticmethod
    def _reparent(inode: Inode, old_dir: Inode, new_dir: Inode) -> None:
        """A directory's '..' moves with it: nlink = 2 + subdirectories on both sides. A
        file's `parent` (where its policies are inherited from) follows the name it moves by."""
        if inode.is_dir:
            old_dir.nlink -= 1
            new_dir.nlink += 1
            inode.parent = new_dir.ino
        elif inode.is_reg:
            inode.parent = new_dir.ino

    # ------------------------------------------------------------ helpers

    def _entry(self, txn: lmdb.Transaction, directory: Inode, name: bytes) -> Entry:
        entry = self.entries.find(txn, directory.ino, validate_name(name))
        if entry is None:
            raise DfsError(Code.ENOENT, f"no entry {shown(name)} in directory {directory.ino}")
        return entry

    def _vacant(self, txn: lmdb.Transaction, parent: int, name: bytes) -> Inode:
        """The parent directory, after checking `name` is valid and free in it."""
        directory = self.inodes.get_dir(txn, parent)
        if self.entries.find(txn, parent, validate_new_name(name)) is not None:
            raise DfsError(Code.EEXIST, f"{shown(name)} exists")
        return directory

    def _link_new(self, txn: lmdb.Transaction, directory: Inode, name: bytes, inode: Inode,
                  now_ns: int) -> Attr:
        self.entries.add(txn, directory, name, inode.ino)
        self._touch(directory, now_ns)
        self.inodes.put(txn, inode)
        self.inodes.put(txn, directory)
        return inode.attr()

    @staticmethod
    def _touch(directory: Inode, now_ns: int) -> None:
        directory.mtime_ns = directory.ctime_ns = now_ns
