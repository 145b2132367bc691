"""Namespace repairs the checker asks for: drop a dangling entry, relink an unlinked inode.

Each function is one step inside the caller's write transaction and re-checks the problem
there, so a repair that raced a normal operation (the entry was since removed, the inode was
since linked) does nothing. Unlinked inodes go to /lost+found as `#INO`, as fsck does: their
data is kept for the operator to look at, never deleted by a checker.
"""

from __future__ import annotations

import stat

import lmdb

from dfs.meta.inode import ROOT_INO, Inode
from dfs.meta.namespace import Namespace

LOST_FOUND = b"lost+found"


def entry_is_dangling(ns: Namespace, txn: lmdb.Transaction, parent: int, name: bytes) -> bool:
    entry = ns.entries.find(txn, parent, name)
    if entry is None:
        return False
    directory = ns.inodes.find(txn, parent)
    return (directory is None or not directory.is_dir
            or ns.inodes.find(txn, entry.ino) is None)


def drop_dangling(ns: Namespace, txn: lmdb.Transaction, parent: int, name: bytes,
                  now_ns: int) -> bool:
    """Remove the entry (parent, name) if it names a missing inode or sits in a missing dir."""
    if not entry_is_dangling(ns, txn, parent, name):
        return False
    entry = ns.entries.find(txn, parent, name)
    assert entry is not None
    ns.entries.remove(txn, entry)
    directory = ns.inodes.find(txn, parent)
    if directory is not None and directory.is_dir:
        directory.mtime_ns = directory.ctime_ns = now_ns
        ns.inodes.put(txn, directory)
    return True


def lost_found(ns: Namespace, txn: lmdb.Transaction, now_ns: int) -> Inode:
    """/lost+found, made (mode 0700) if missing."""
    entry = ns.entries.find(txn, ROOT_INO, LOST_FOUND)
    if entry is not None:
        found = ns.inodes.find(txn, entry.ino)
        if found is not None and found.is_dir:
            return found
        if found is None:
            ns.entries.remove(txn, entry)
        else:
            raise ValueError("/lost+found exists and is not a directory")
    attr = ns.mkdir(txn, ROOT_INO, LOST_FOUND, stat.S_IFDIR | 0o700, 0, 0, now_ns)
    return ns.inodes.get(txn, attr["ino"])


def relink(ns: Namespace, txn: lmdb.Transaction, ino: int, now_ns: int) -> bytes | None:
    """Link inode `ino` into /lost+found as `#INO`; the name used, or None if not needed.

    There is no index from an inode to its names, so "has no entry" is the caller's finding
    (the checker confirms it with a second full walk of the entries before asking).
    """
    inode = ns.inodes.find(txn, ino)
    if inode is None or ino == ROOT_INO:
        return None
    directory = lost_found(ns, txn, now_ns)
    if directory.ino == ino:
        return None
    name = f"#{ino}".encode()
    if ns.entries.find(txn, directory.ino, name) is not None:
        return None
    ns.entries.add(txn, directory, name, ino)
    if inode.is_dir:
        inode.parent = directory.ino
        directory.nlink += 1
    inode.ctime_ns = now_ns
    directory.mtime_ns = directory.ctime_ns = now_ns
    ns.inodes.put(txn, inode)
    ns.inodes.put(txn, directory)
    return name
