"""The read-only namespace of snapshots: what lookup, getattr, readdir, readlink and the
xattr reads answer for a snapshot inode number (dfs/meta/snapshots.py, `snap_ino`).

`DIR/.snapshots` is a virtual directory of every live directory (reachable by name, never
listed, like ZFS's hidden .zfs); its entries are DIR's snapshots by name, each the snapshot's
copy of DIR. Below that everything is the snapshot's own copy, with write bits cleared.
"""

from __future__ import annotations

import stat
from typing import Any

import lmdb

from dfs.errors import Code, DfsError
from dfs.meta.inode import FIRST_COOKIE, Inode, InodeTable, validate_name
from dfs.meta.record import shown
from dfs.meta.snapshots import (
    SNAPSHOTS_DIR,
    SnapshotTable,
    read_only,
    snap_ino,
    split_snap_ino,
)

Attr = dict[str, Any]


class SnapshotView:
    def __init__(self, inodes: InodeTable, snapshots: SnapshotTable) -> None:
        self.inodes = inodes
        self.snapshots = snapshots

    def listing_attr(self, directory: Inode) -> Attr:
        """The virtual `.snapshots` directory of a live directory."""
        return {**directory.attr(), "ino": snap_ino(0, directory.ino),
                "mode": stat.S_IFDIR | 0o555, "nlink": 2, "size": 0, "version": 0,
                "blob": None, "checksum": None, "replicas": []}

    def _inode(self, txn: lmdb.Transaction, snap: int, ino: int) -> Inode:
        inode = self.snapshots.inode(txn, snap, ino)
        if inode is None:
            raise DfsError(Code.ENOENT, f"snapshot {snap} holds no inode {ino}")
        return inode

    def getattr(self, txn: lmdb.Transaction, ino: int) -> Attr:
        snap, original = split_snap_ino(ino)
        if snap == 0:
            return self.listing_attr(self.inodes.get_dir(txn, original))
        return read_only(snap, self._inode(txn, snap, original))

    def inode(self, txn: lmdb.Transaction, ino: int) -> Inode:
        """The snapshot's record behind a snapshot ino (not the virtual listing)."""
        snap, original = split_snap_ino(ino)
        if snap == 0:
            raise DfsError(Code.EINVAL, "the .snapshots directory holds no data")
        return self._inode(txn, snap, original)

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> Attr:
        validate_name(name)
        snap, original = split_snap_ino(parent)
        if snap == 0:
            self.inodes.get_dir(txn, original)
            found = self.snapshots.find(txn, original, name)
            if found is None:
                raise DfsError(Code.ENOENT, f"no snapshot {shown(name)}")
            return read_only(found.id, self._inode(txn, found.id, original))
        if not self._inode(txn, snap, original).is_dir:
            raise DfsError(Code.ENOTDIR, f"inode {parent} is not a directory")
        child = self.snapshots.entry(txn, snap, original, name)
        if child is None:
            raise DfsError(Code.ENOENT, f"no entry {shown(name)} in that snapshot directory")
        return read_only(snap, self._inode(txn, snap, child))

    def parent(self, txn: lmdb.Transaction, ino: int) -> int:
        """'..' inside a snapshot: its parent there; of its root, the `.snapshots` listing;
        of the listing, the live directory."""
        snap, original = split_snap_ino(ino)
        if snap == 0:
            return original
        record = self.snapshots.get(txn, snap)
        if record is not None and record.root == original:
            return snap_ino(0, original)
        return snap_ino(snap, self._inode(txn, snap, original).parent or original)

    def readdir(self, txn: lmdb.Transaction, ino: int, after: int, limit: int
                ) -> list[list[Any]]:
        snap, original = split_snap_ino(ino)
        out: list[list[Any]] = []
        if snap == 0:
            self.inodes.get_dir(txn, original)
            for s in self.snapshots.list(txn, original):
                cookie = s.id + FIRST_COOKIE
                if s.state == "ready" and cookie > after and len(out) < limit:
                    out.append([s.name.encode("utf-8", "surrogateescape"), cookie,
                                read_only(s.id, self._inode(txn, s.id, original))])
            return out
        if not self._inode(txn, snap, original).is_dir:
            raise DfsError(Code.ENOTDIR, f"inode {ino} is not a directory")
        for name, cookie, child in self.snapshots.entries(txn, snap, original, after, limit):
            inode = self.snapshots.inode(txn, snap, child)
            if inode is not None:
                out.append([name, cookie, read_only(snap, inode)])
        return out


def is_listing_name(name: bytes) -> bool:
    return name == SNAPSHOTS_DIR
