"""Inodes: the record, name rules, and the table that stores, allocates and frees them.

Inode numbers are never reused (a counter in `meta`), so `generation` is constant and a
stale (ino, version) can never name another file's content.
"""

from __future__ import annotations

from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.cluster import NEXT_INO, ClusterMeta
from dfs.meta.codec import k64, unk64
from dfs.meta.gcqueue import GcQueue
from dfs.meta.record import (  # noqa: F401 - re-exported: the table and its record
    DEVICE_KINDS,
    FIRST_COOKIE,
    NAME_MAX,
    RDEV_MAX,
    RESERVED_NAMES,
    ROOT_INO,
    SPECIAL_KINDS,
    SYMLINK_MAX,
    XATTR_VALUE_MAX,
    Inode,
    validate_name,
    validate_new_name,
)
from dfs.meta.snapshots import SnapFile, SnapshotTable, is_snap_ino
from dfs.meta.versions import Version, VersionTable


class InodeTable:
    """The `inodes` sub-database: ino (u64 BE) -> msgpack record, and its index `blobs`:
    blob id (u64 BE) -> the ino whose current blob it is (u64 BE).

    The index answers "is this blob current, and where?" with one point read, after the
    blob's transaction record was purged: OUTCOME, the checker's `blob_refs` and the GC ask
    it. It changes only where an inode's blob does (install_version, retire_blob), in the same
    transaction. A blob belongs to one inode for good (blob ids are txids, never reused).
    """

    def __init__(self, db: Database, meta: ClusterMeta, gc: GcQueue, gc_grace_ns: int) -> None:
        self._db = db["inodes"]
        self._blobs = db["blobs"]
        self._meta = meta
        self._gc = gc
        self.gc_grace_ns = gc_grace_ns
        self.versions = VersionTable(db, gc, gc_grace_ns)
        self.snapshots = SnapshotTable(db, meta, gc, gc_grace_ns)

    def find(self, txn: lmdb.Transaction, ino: int) -> Inode | None:
        raw = txn.get(k64(ino), db=self._db)
        return None if raw is None else Inode.decode(ino, raw)

    def get(self, txn: lmdb.Transaction, ino: int) -> Inode:
        inode = self.find(txn, ino)
        if inode is None and is_snap_ino(ino):
            # Reads of a snapshot are routed before they get here (dfs/meta/snapview.py):
            # what arrives is a change, and a snapshot is read-only.
            raise DfsError(Code.EROFS, "a snapshot is read-only")
        if inode is None:
            raise DfsError(Code.ENOENT, f"no inode {ino}")
        return inode

    def get_dir(self, txn: lmdb.Transaction, ino: int) -> Inode:
        inode = self.get(txn, ino)
        if not inode.is_dir:
            raise DfsError(Code.ENOTDIR, f"inode {ino} is not a directory")
        return inode

    def put(self, txn: lmdb.Transaction, inode: Inode) -> None:
        txn.put(k64(inode.ino), inode.encode(), db=self._db)

    # ------------------------------------------------------------ the blob index

    def current(self, txn: lmdb.Transaction, blob: int) -> Inode | None:
        """The inode whose current blob is `blob`, if any (two point reads)."""
        raw = txn.get(k64(blob), db=self._blobs)
        inode = None if raw is None else self.find(txn, unk64(raw))
        return inode if inode is not None and inode.blob == blob else None

    def index_blob(self, txn: lmdb.Transaction, inode: Inode) -> None:
        """`inode.blob` is now the inode's current blob."""
        if inode.blob is not None:
            txn.put(k64(inode.blob), k64(inode.ino), db=self._blobs)

    def build_blob_index(self, txn: lmdb.Transaction) -> int:
        """Index every inode's current blob (once, for metadata written before the index)."""
        count = 0
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                inode = Inode.decode(unk64(key), value)
                if inode.blob is not None:
                    self.index_blob(txn, inode)
                    count += 1
        return count

    def allocate(self, txn: lmdb.Transaction, mode: int, uid: int, gid: int, now_ns: int,
                 **extra: Any) -> Inode:
        ino = self._meta.next_counter(txn, NEXT_INO, ROOT_INO + 1)
        return Inode(ino=ino, mode=mode, uid=uid, gid=gid, atime_ns=now_ns, mtime_ns=now_ns,
                     ctime_ns=now_ns, **extra)

    def retire_blob(self, txn: lmdb.Transaction, inode: Inode, now_ns: int) -> None:
        """Queue the inode's current blob for deletion on its replicas after the grace period.

        The grace lets a reader that already holds the old attrs finish reading (docs/design.md §6).
        """
        if inode.blob is not None:
            txn.delete(k64(inode.blob), db=self._blobs)
            not_before = now_ns + self.gc_grace_ns
            for node in inode.replicas:
                self._gc.add(txn, not_before, node, inode.blob, inode.ino)

    def supersede(self, txn: lmdb.Transaction, inode: Inode, keep: int, now_ns: int) -> None:
        """The inode's current content is being replaced: kept as a retained version when
        the file keeps any (docs/coordinator.md, "Version history"), else queued for GC."""
        if keep <= 0 or not inode.is_reg:
            self.retire_blob(txn, inode, now_ns)
            return
        if inode.version == 0 and inode.blob is None:
            return  # the empty file create made is no content worth a place in the history
        if inode.blob is not None:
            txn.delete(k64(inode.blob), db=self._blobs)  # current no more; `retained` holds it
        self.versions.retain(txn, Version(inode.ino, inode.version, inode.blob, inode.size,
                                          inode.checksum, list(inode.replicas),
                                          inode.mtime_ns), keep, now_ns)

    def holders(self, txn: lmdb.Transaction, blob: int) -> list[Inode | Version | SnapFile]:
        """Everything that still names `blob`: the file whose current blob it is, every
        retained version of it and every snapshot holding it (the reference count the GC
        and the checker go by)."""
        out: list[Inode | Version | SnapFile] = []
        inode = self.current(txn, blob)
        if inode is not None:
            out.append(inode)
        out.extend(self.versions.holders(txn, blob))
        out.extend(self.snapshots.holders(txn, blob))
        return out

    def holder(self, txn: lmdb.Transaction, ino: int, blob: int | None
               ) -> Inode | Version | SnapFile | None:
        """What of file `ino` names `blob` (its current content first, else a retained
        version or a snapshot's copy: a snapshot keeps a deleted file's ino); blob None: its
        current content. None if nothing does (it moved on)."""
        inode = self.find(txn, ino)
        if inode is not None and inode.is_reg and (blob is None or inode.blob == blob):
            return inode if inode.blob is not None else None
        if blob is None:
            return None
        return next((h for h in self.holders(txn, blob) if h.ino == ino), None)

    def set_replicas(self, txn: lmdb.Transaction, ino: int, blob: int, replicas: list[int]
                     ) -> None:
        """A repair moved blob's copies: every record of file `ino` naming it says so."""
        for held in self.holders(txn, blob):
            if held.ino != ino:
                continue
            held.replicas = list(replicas)
            if isinstance(held, Inode):
                self.put(txn, held)
            elif isinstance(held, SnapFile):
                self.snapshots.put_file(txn, held)
            else:
                self.versions.put(txn, held)

    def lists(self, txn: lmdb.Transaction, blob: int, node: int) -> bool:
        """Does anything that names `blob` list a copy of it on `node`?"""
        return any(node in h.replicas for h in self.holders(txn, blob))

    def drop_link(self, txn: lmdb.Transaction, inode: Inode, now_ns: int) -> None:
        """One name of a non-directory is gone: delete the inode with its last link (and its
        retained versions: a version history belongs to a file that exists)."""
        inode.nlink -= 1
        inode.ctime_ns = now_ns
        if inode.nlink > 0:
            self.put(txn, inode)
            return
        self.retire_blob(txn, inode, now_ns)
        self.versions.drop_all(txn, inode.ino, now_ns)
        txn.delete(k64(inode.ino), db=self._db)

    def delete_dir(self, txn: lmdb.Transaction, inode: Inode) -> None:
        txn.delete(k64(inode.ino), db=self._db)

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]
