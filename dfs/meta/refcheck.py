"""The reference counts, checked: every index entry that keeps a blob alive matches a record
that names it, and every such record has its entry (docs/checker.md, "Reference counts").

A missing `retained` or `snapheld` entry is the dangerous kind: the GC would see one holder
fewer and could delete copies a kept version or a snapshot still needs. A stale one only
keeps a blob alive too long (a leak). A kept version of a file that no longer exists is a
leak too (deleting a file drops its history). Each finding is judged in a read, then fixed
in its own write that re-checks it, so a repair never acts on what it did not see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from dfs.meta.codec import U64x2, U64x3, k64
from dfs.meta.record import Inode
from dfs.meta.versions import Version

#: Findings one check reports in full; past it they are counted, not listed.
REFCHECK_FINDINGS_MAX = 1000


@dataclass(frozen=True, slots=True)
class RefFinding:
    """kind: missing_ref (a record with no index entry: GC could delete its copies),
    stale_ref (an index entry without its record: a leak), orphan_version (a kept version
    of a deleted file)."""

    kind: str
    table: str  # retained | snapheld | versions
    blob: int | None
    ino: int
    at: int  # the version, or the snapshot id

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "table": self.table, "blob": self.blob, "ino": self.ino,
                "at": self.at}


class _Capped:
    def __init__(self) -> None:
        self.items: list[RefFinding] = []
        self.total = 0

    def add(self, f: RefFinding) -> None:
        self.total += 1
        if len(self.items) < REFCHECK_FINDINGS_MAX:
            self.items.append(f)


class RefCheck:
    def __init__(self, db: Any, inodes: Any) -> None:
        self._dbs = {name: db[name] for name in ("versions", "retained", "snapinodes",
                                                 "snapheld", "inodes")}
        self.inodes = inodes

    def _walk(self, txn: lmdb.Transaction, name: str) -> Iterator[tuple[bytes, bytes]]:
        with txn.cursor(db=self._dbs[name]) as cur:
            for key, value in cur:
                yield bytes(key), bytes(value)

    def judge(self, txn: lmdb.Transaction) -> tuple[list[RefFinding], int]:
        """The inconsistencies (the first REFCHECK_FINDINGS_MAX of them) and how many there
        are, in one read transaction (one consistent view; memory bounded by the cap)."""
        found = _Capped()
        for f in self._judge(txn):
            found.add(f)
        return found.items, found.total

    def _judge(self, txn: lmdb.Transaction) -> Iterator[RefFinding]:
        for key, value in self._walk(txn, "versions"):
            v = Version.decode(key, value)
            if txn.get(k64(v.ino), db=self._dbs["inodes"]) is None:
                yield RefFinding("orphan_version", "versions", v.blob, v.ino, v.version)
            elif v.blob is not None and txn.get(U64x3.pack(v.blob, v.ino, v.version),
                                                db=self._dbs["retained"]) is None:
                yield RefFinding("missing_ref", "retained", v.blob, v.ino, v.version)
        for key, _ in self._walk(txn, "retained"):
            blob, ino, version = U64x3.unpack(key)
            found = self.inodes.versions.find(txn, ino, version)
            if found is None or found.blob != blob:
                yield RefFinding("stale_ref", "retained", blob, ino, version)
        for key, value in self._walk(txn, "snapinodes"):
            snap, ino = U64x2.unpack(key)
            inode = Inode.decode(ino, value)
            if inode.is_reg and inode.blob is not None and txn.get(
                    U64x3.pack(inode.blob, snap, ino), db=self._dbs["snapheld"]) is None:
                yield RefFinding("missing_ref", "snapheld", inode.blob, ino, snap)
        for key, _ in self._walk(txn, "snapheld"):
            blob, snap, ino = U64x3.unpack(key)
            raw = txn.get(U64x2.pack(snap, ino), db=self._dbs["snapinodes"])
            if raw is None or Inode.decode(ino, raw).blob != blob:
                yield RefFinding("stale_ref", "snapheld", blob, ino, snap)

    def repair(self, txn: lmdb.Transaction, f: RefFinding, now_ns: int) -> bool:
        """Fix one finding if it still holds (re-checked in this transaction)."""
        if f.table == "retained" or f.kind == "orphan_version":
            version = self.inodes.versions.find(txn, f.ino, f.at)
            if f.kind == "orphan_version":
                if version is None or self.inodes.find(txn, f.ino) is not None:
                    return False
                self.inodes.versions.drop(txn, version, now_ns)  # its copies go to GC
                return True
            if f.kind == "missing_ref":
                if version is None or version.blob != f.blob:
                    return False
                self.inodes.versions.put(txn, version)  # writes the index entry again
                return True
            if version is not None and version.blob == f.blob:
                return False
            assert f.blob is not None
            return bool(txn.delete(U64x3.pack(f.blob, f.ino, f.at), db=self._dbs["retained"]))
        assert f.blob is not None
        key = U64x3.pack(f.blob, f.at, f.ino)
        raw = txn.get(U64x2.pack(f.at, f.ino), db=self._dbs["snapinodes"])
        names_it = raw is not None and Inode.decode(f.ino, raw).blob == f.blob
        if f.kind == "missing_ref":
            if not names_it:
                return False
            txn.put(key, b"", db=self._dbs["snapheld"])
            return True
        if names_it:
            return False
        return bool(txn.delete(key, db=self._dbs["snapheld"]))
