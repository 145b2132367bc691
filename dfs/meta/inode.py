"""Inodes: the record, name rules, and the table that stores, allocates and frees them.

Inode numbers are never reused (a counter in `meta`), so `generation` is constant and a
stale (ino, version) can never name another file's content.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, fields
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.cluster import NEXT_INO, ClusterMeta
from dfs.meta.codec import k64, pack, unk64, unpack
from dfs.meta.gcqueue import GcQueue
from dfs.meta.versions import Version, VersionTable

ROOT_INO = 1
NAME_MAX = 255
SYMLINK_MAX = 4096
XATTR_VALUE_MAX = 64 * 1024
# The first readdir cookie of a directory; 1 and 2 stay free for a client's "." and "..".
FIRST_COOKIE = 3
# The metadata-only kinds (FIFOs, devices, sockets): the kernel serves their data, dfs only
# stores the inode; devices also keep their device number (`rdev`).
SPECIAL_KINDS = frozenset({stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK})
DEVICE_KINDS = frozenset({stat.S_IFCHR, stat.S_IFBLK})
RDEV_MAX = (1 << 64) - 1


#: Names no entry may take: a mount shows every directory's kept versions and snapshots under
#: them (docs/mount.md, "Versions and snapshots"), so a real entry could never clash with them.
RESERVED_NAMES = frozenset({b".versions", b".snapshots"})


def validate_new_name(name: bytes) -> bytes:
    """A name an entry is about to take: valid, and not one of the mount's virtual ones."""
    validate_name(name)
    if name in RESERVED_NAMES:
        raise DfsError(Code.EINVAL, f"{name.decode()} is reserved: a mount shows a "
                                    "directory's versions and snapshots there")
    return name


def validate_name(name: bytes) -> bytes:
    """A directory entry name (docs/design.md §3): 1-255 bytes, no '/', no NUL, not '.' or '..'."""
    if not isinstance(name, bytes):
        raise DfsError(Code.EINVAL, f"a name must be bytes, not {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise DfsError(Code.ENAMETOOLONG, f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise DfsError(Code.EINVAL, f"invalid name {name!r}")
    return name


@dataclass(slots=True)
class Inode:
    """One inode record. Directories also carry `parent` and `next_cookie`; a regular file
    carries `parent` too: the directory of its first name, where its inherited policies
    (`user.dfs.keep_versions`) are looked up (0 in records from before)."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    version: int = 0
    blob: int | None = None
    checksum: bytes | None = None
    replicas: list[int] = field(default_factory=list)
    target: bytes | None = None
    generation: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    parent: int = 0
    next_cookie: int = FIRST_COOKIE
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_special(self) -> bool:
        """A FIFO, device or socket: an inode with no content in dfs."""
        return stat.S_IFMT(self.mode) in SPECIAL_KINDS

    def attr(self) -> dict[str, Any]:
        """The wire `attr` map (docs/protocol.md), without xattrs or directory bookkeeping."""
        return {
            "ino": self.ino,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "nlink": self.nlink,
            "size": self.size,
            "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "version": self.version,
            "blob": self.blob,
            "checksum": self.checksum,
            "replicas": list(self.replicas),
            "target": self.target,
            "generation": self.generation,
            "rdev": self.rdev,
        }

    def encode(self) -> bytes:
        record = {f.name: getattr(self, f.name) for f in _FIELDS if f.name != "ino"}
        if not self.is_dir:
            del record["next_cookie"]
            if not (self.is_reg and self.parent):
                del record["parent"]
        if not self.rdev:
            del record["rdev"]
        return pack(record)

    @classmethod
    def decode(cls, ino: int, data: bytes) -> Inode:
        record = unpack(data)
        return cls(ino=ino, **{k: v for k, v in record.items() if k in _NAMES})


_FIELDS = fields(Inode)
_NAMES = frozenset(f.name for f in _FIELDS)


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

    def find(self, txn: lmdb.Transaction, ino: int) -> Inode | None:
        raw = txn.get(k64(ino), db=self._db)
        return None if raw is None else Inode.decode(ino, raw)

    def get(self, txn: lmdb.Transaction, ino: int) -> Inode:
        inode = self.find(txn, ino)
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

    def holders(self, txn: lmdb.Transaction, blob: int) -> list[Inode | Version]:
        """Everything that still names `blob`: the file whose current blob it is, and every
        retained version of it (the reference count the GC and the checker go by)."""
        out: list[Inode | Version] = []
        inode = self.current(txn, blob)
        if inode is not None:
            out.append(inode)
        out.extend(self.versions.holders(txn, blob))
        return out

    def holder(self, txn: lmdb.Transaction, ino: int, blob: int | None) -> Inode | Version | None:
        """What of file `ino` names `blob` (its current content first, else a retained
        version); blob None: its current content. None if neither does (it moved on)."""
        inode = self.find(txn, ino)
        if inode is None or not inode.is_reg:
            return None
        if blob is None or inode.blob == blob:
            return inode if inode.blob is not None else None
        return next((v for v in self.versions.holders(txn, blob) if v.ino == ino), None)

    def set_replicas(self, txn: lmdb.Transaction, ino: int, blob: int, replicas: list[int]
                     ) -> None:
        """A repair moved blob's copies: every record of file `ino` naming it says so."""
        for held in self.holders(txn, blob):
            if held.ino != ino:
                continue
            held.replicas = list(replicas)
            if isinstance(held, Inode):
                self.put(txn, held)
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
