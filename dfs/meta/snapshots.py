"""Snapshots: a read-only, point-in-time copy of a subtree's metadata (docs/coordinator.md,
"Snapshots"). Blobs are immutable and named by their transaction, so a snapshot copies
inodes and entries only and shares every blob with the files it was taken of.

Sub-databases (ids and inos u64 BE):
- `snapshots`: id -> {name, root, path, created_ns, state, inodes, bytes}; state is
  "creating" until the last piece is written, "ready", or "deleting" while it is dropped.
- `snapnames`: root ino + name -> id: the names `ROOT/.snapshots/NAME` resolves.
- `snapinodes`: id + ino -> the inode record as `inodes` holds it, at the snapshot's point.
- `snapentries`: id + parent + name -> child ino + cookie; `snapcookies`: id + parent +
  cookie -> name (readdir order, as `dentries`/`dircookies`).
- `snapheld`: blob + id + ino -> empty: the snapshot's share of each blob's reference count.

Through the namespace a snapshot is reached with encoded inode numbers (`snap_ino`): the high
bit set, the snapshot id, the original ino. Id 0 is the virtual `.snapshots` directory of a
directory. Every read op routes such an ino here; every write op finds no live inode of that
number and is refused with EROFS, so a snapshot cannot be changed by mistake.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.cluster import ClusterMeta
from dfs.meta.codec import U64x2, U64x3, held_by, k64, pack, unk64, unpack
from dfs.meta.gcqueue import GcQueue
from dfs.meta.record import Inode, shown, validate_name

SNAP_BIT = 1 << 63
SNAP_SHIFT = 40  # live inode numbers stay below 2^40 (a counter: 10^12 files)
INO_MASK = (1 << SNAP_SHIFT) - 1
#: Snapshot ids use bits 40-61: bit 62 stays clear, above it a mount numbers its own virtual
#: inodes (fuse_mount/virtual.py, VIRTUAL_BASE).
SNAP_ID_MAX = (1 << (62 - SNAP_SHIFT)) - 1
#: Inodes (files and directories) one snapshot may copy: its walk is held in memory.
SNAPSHOT_INODES_MAX = 1_000_000
#: Keys written (or dropped) per piece: one group commit each, so writers elsewhere wait for
#: at most one piece, never for the whole snapshot (the coordinator's `snapshot_piece`).
SNAPSHOT_PIECE = 4_000
NEXT_SNAPSHOT = b"next_snapshot_id"
SNAPSHOTS_DIR = b".snapshots"
CREATING, READY, DELETING = "creating", "ready", "deleting"
SUBDBS = ["snapshots", "snapnames", "snapinodes", "snapentries", "snapcookies", "snapheld"]


def snap_ino(snap: int, ino: int) -> int:
    assert 0 <= snap <= SNAP_ID_MAX and 0 < ino <= INO_MASK, (snap, ino)
    return SNAP_BIT | snap << SNAP_SHIFT | ino


def is_snap_ino(ino: int) -> bool:
    return bool(ino & SNAP_BIT)


def split_snap_ino(ino: int) -> tuple[int, int]:
    """(snapshot id, original ino); id 0: the `.snapshots` directory of directory ino."""
    return (ino & ~SNAP_BIT) >> SNAP_SHIFT, ino & INO_MASK


def read_only(snap: int, inode: Inode) -> dict[str, Any]:
    """The attr a snapshot shows of one of its inodes: its own number, no write bits."""
    attr = inode.attr()
    attr["ino"] = snap_ino(snap, inode.ino)
    attr["mode"] = inode.mode & ~0o222
    return attr


@dataclass(slots=True)
class Snapshot:
    id: int
    name: str
    root: int
    path: str
    created_ns: int
    state: str = CREATING
    inodes: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "root": self.root, "path": self.path,
                "created_ns": self.created_ns, "state": self.state, "inodes": self.inodes,
                "bytes": self.bytes}

    def encode(self) -> bytes:
        doc = self.to_json()
        del doc["id"]
        return pack(doc)

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> Snapshot:
        doc = unpack(value)
        return cls(unk64(key), doc["name"], doc["root"], doc.get("path", ""),
                   doc.get("created_ns", 0), doc.get("state", READY), doc.get("inodes", 0),
                   doc.get("bytes", 0))


@dataclass(slots=True)
class SnapFile:
    """A file as a snapshot holds it: one holder of its blob (docs/coordinator.md)."""

    snap: int
    inode: Inode

    @property
    def ino(self) -> int:
        return self.inode.ino

    @property
    def blob(self) -> int | None:
        return self.inode.blob

    @property
    def size(self) -> int:
        return self.inode.size

    @property
    def checksum(self) -> bytes | None:
        return self.inode.checksum

    @property
    def replicas(self) -> list[int]:
        return self.inode.replicas

    @replicas.setter
    def replicas(self, value: list[int]) -> None:
        self.inode.replicas = value


Put = tuple[str, bytes, bytes]  # (sub-database, key, value)


class SnapshotTable:
    def __init__(self, db: Database, meta: ClusterMeta, gc: GcQueue, gc_grace_ns: int) -> None:
        self._dbs = {name: db[name] for name in SUBDBS}
        self._live_inodes = db["inodes"]
        self._live_dentries = db["dentries"]
        self._meta = meta
        self._gc = gc
        self.gc_grace_ns = gc_grace_ns

    # ------------------------------------------------------------ the records

    def get(self, txn: lmdb.Transaction, snap: int) -> Snapshot | None:
        raw = txn.get(k64(snap), db=self._dbs["snapshots"])
        return None if raw is None else Snapshot.decode(k64(snap), raw)

    def find(self, txn: lmdb.Transaction, root: int, name: bytes) -> Snapshot | None:
        raw = txn.get(k64(root) + name, db=self._dbs["snapnames"])
        snapshot = None if raw is None else self.get(txn, unk64(raw))
        return snapshot if snapshot is not None and snapshot.state == READY else None

    def list(self, txn: lmdb.Transaction, root: int | None = None) -> list[Snapshot]:
        """Every snapshot (of `root` only, if given), by id."""
        with txn.cursor(db=self._dbs["snapshots"]) as cur:
            found = [Snapshot.decode(bytes(k), v) for k, v in cur]
        return [s for s in found if root is None or s.root == root]

    def begin(self, txn: lmdb.Transaction, root: Inode, name: bytes, path: str,
              now_ns: int) -> Snapshot:
        """Name a new snapshot of directory `root` (state creating, invisible until ready)."""
        if not root.is_dir:
            raise DfsError(Code.ENOTDIR, f"{path} is not a directory: snapshots are of subtrees")
        validate_name(name)
        if txn.get(k64(root.ino) + name, db=self._dbs["snapnames"]) is not None:
            raise DfsError(Code.EEXIST, f"{path} has a snapshot named {shown(name)}")
        snap = self._meta.next_counter(txn, NEXT_SNAPSHOT, 1)
        if snap > SNAP_ID_MAX:
            raise DfsError(Code.TOO_BIG, f"snapshot ids are used up ({SNAP_ID_MAX})")
        snapshot = Snapshot(snap, name.decode("utf-8", "surrogateescape"), root.ino, path,
                            now_ns)
        txn.put(k64(snap), snapshot.encode(), db=self._dbs["snapshots"])
        txn.put(k64(root.ino) + name, k64(snap), db=self._dbs["snapnames"])
        return snapshot

    def collect(self, txn: lmdb.Transaction, snap: int, root: int
                ) -> tuple[list[Put], int, int]:
        """The keys that copy the subtree at `root` as this read transaction sees it (one
        point in time), and its inode count and file bytes. Raw records are copied as they
        are; only a file's blob is decoded, for its share of the reference count."""
        puts: list[Put] = []
        sid = k64(snap)
        inodes = total = 0
        todo = [root]
        while todo:
            directory = todo.pop()
            raw = txn.get(k64(directory), db=self._live_inodes)
            if raw is None:
                continue
            puts.append(("snapinodes", sid + k64(directory), bytes(raw)))
            inodes += 1
            prefix = k64(directory)
            with txn.cursor(db=self._live_dentries) as cur:
                found = cur.set_range(prefix)
                while found and cur.key().startswith(prefix):
                    key, value = bytes(cur.key()), bytes(cur.value())
                    child, cookie = U64x2.unpack(value)
                    child_raw = txn.get(k64(child), db=self._live_inodes)
                    record = {} if child_raw is None else unpack(child_raw)
                    if record.get("unwritten"):
                        found = cur.next()  # being created: not in the tree yet (§6)
                        continue
                    puts.append(("snapentries", sid + key, value))
                    puts.append(("snapcookies", sid + U64x2.pack(directory, cookie), key[8:]))
                    if child_raw is not None:
                        if stat.S_ISDIR(record.get("mode", 0)):
                            todo.append(child)
                        else:
                            inodes += 1
                            total += record.get("size", 0) if record.get("blob") else 0
                            puts.append(("snapinodes", sid + k64(child), bytes(child_raw)))
                            if record.get("blob") is not None:
                                puts.append(("snapheld", U64x3.pack(record["blob"], snap, child),
                                             b""))
                    if inodes > SNAPSHOT_INODES_MAX:
                        raise DfsError(Code.TOO_BIG, f"a snapshot holds at most "
                                                     f"{SNAPSHOT_INODES_MAX} inodes")
                    found = cur.next()
        return puts, inodes, total

    def put_piece(self, txn: lmdb.Transaction, puts: list[Put]) -> None:
        for db, key, value in puts:
            txn.put(key, value, db=self._dbs[db])  # a hard link's inode comes twice: same bytes

    def finish(self, txn: lmdb.Transaction, snap: int, inodes: int, total: int) -> Snapshot:
        snapshot = self.get(txn, snap)
        if snapshot is None or snapshot.state != CREATING:
            raise DfsError(Code.ENOENT, f"snapshot {snap} is gone")
        snapshot.state, snapshot.inodes, snapshot.bytes = READY, inodes, total
        txn.put(k64(snap), snapshot.encode(), db=self._dbs["snapshots"])
        return snapshot

    def unname(self, txn: lmdb.Transaction, root: int, name: bytes) -> Snapshot:
        """Make the snapshot invisible and mark it for dropping (its keys go in pieces)."""
        raw = txn.get(k64(root) + name, db=self._dbs["snapnames"])
        snapshot = None if raw is None else self.get(txn, unk64(raw))
        if snapshot is None:
            raise DfsError(Code.ENOENT, f"no snapshot named {shown(name)} there")
        txn.delete(k64(root) + name, db=self._dbs["snapnames"])
        snapshot.state = DELETING
        txn.put(k64(snapshot.id), snapshot.encode(), db=self._dbs["snapshots"])
        return snapshot

    def drop_piece(self, txn: lmdb.Transaction, snap: int, now_ns: int,
                   lists: Any) -> bool:
        """Drop up to SNAPSHOT_PIECE of the snapshot's keys; True once none is left (its
        record goes with the last piece). A file's copies are queued for GC unless something
        else still names them there (`lists(txn, blob, node)`)."""
        sid = k64(snap)
        budget = SNAPSHOT_PIECE
        for db in ("snapentries", "snapcookies", "snapinodes"):
            with txn.cursor(db=self._dbs[db]) as cur:
                while budget and cur.set_range(sid) and cur.key().startswith(sid):
                    if db == "snapinodes":
                        self._release(txn, snap, Inode.decode(unk64(cur.key()[8:]),
                                                              cur.value()), now_ns, lists)
                    cur.delete()
                    budget -= 1
            if not budget:
                return False
        txn.delete(sid, db=self._dbs["snapshots"])
        return True

    def _release(self, txn: lmdb.Transaction, snap: int, inode: Inode, now_ns: int,
                 lists: Any) -> None:
        if inode.blob is None or not stat.S_ISREG(inode.mode):
            return
        txn.delete(U64x3.pack(inode.blob, snap, inode.ino), db=self._dbs["snapheld"])
        for node in inode.replicas:
            if not lists(txn, inode.blob, node):
                self._gc.add(txn, now_ns + self.gc_grace_ns, node, inode.blob, inode.ino)

    def unfinished(self, txn: lmdb.Transaction) -> list[Snapshot]:
        """Snapshots a crash interrupted (creating or deleting): dropped at start."""
        return [s for s in self.list(txn) if s.state != READY]

    # ------------------------------------------------------------ holders

    def holders(self, txn: lmdb.Transaction, blob: int) -> list[SnapFile]:
        out: list[SnapFile] = []
        for snap, ino in list(held_by(txn, self._dbs["snapheld"], blob)):
            inode = self.inode(txn, snap, ino)
            if inode is not None:
                out.append(SnapFile(snap, inode))
        return out

    def put_file(self, txn: lmdb.Transaction, held: SnapFile) -> None:
        """Rewrite a snapshot's record of a file in place (a repair moved its copies)."""
        txn.put(U64x2.pack(held.snap, held.ino), held.inode.encode(),
                db=self._dbs["snapinodes"])

    def files(self, txn: lmdb.Transaction, after: bytes, limit: int
              ) -> tuple[list[SnapFile], bytes | None]:
        """A page of every snapshot's files with a blob (re-replication walks them)."""
        out: list[SnapFile] = []
        last: bytes | None = None
        with txn.cursor(db=self._dbs["snapinodes"]) as cur:
            found = cur.set_range(after) if after else cur.first()
            if found and after and cur.key() == after:
                found = cur.next()
            while found:
                key = bytes(cur.key())
                snap, ino = U64x2.unpack(key)
                inode = Inode.decode(ino, cur.value())
                if inode.is_reg and inode.blob is not None:
                    out.append(SnapFile(snap, inode))
                last = key
                if len(out) >= limit:
                    return out, last
                found = cur.next()
        return out, None

    # ------------------------------------------------------------ reading a snapshot

    def inode(self, txn: lmdb.Transaction, snap: int, ino: int) -> Inode | None:
        raw = txn.get(U64x2.pack(snap, ino), db=self._dbs["snapinodes"])
        return None if raw is None else Inode.decode(ino, raw)

    def entry(self, txn: lmdb.Transaction, snap: int, parent: int, name: bytes) -> int | None:
        raw = txn.get(U64x2.pack(snap, parent) + name, db=self._dbs["snapentries"])
        return None if raw is None else U64x2.unpack(raw)[0]

    def entries(self, txn: lmdb.Transaction, snap: int, parent: int, after: int, limit: int
                ) -> Iterator[tuple[bytes, int, int]]:
        """(name, cookie, child ino) of a snapshot directory, cookie > after, cookie order."""
        prefix = U64x2.pack(snap, parent)
        with txn.cursor(db=self._dbs["snapcookies"]) as cur:
            if not cur.set_range(prefix + k64(after + 1)):
                return
            for key, name in cur:
                if not key.startswith(prefix) or limit <= 0:
                    return
                child = self.entry(txn, snap, parent, bytes(name))
                if child is not None:
                    limit -= 1
                    yield bytes(name), unk64(key[16:]), child
