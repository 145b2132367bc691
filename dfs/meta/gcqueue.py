"""The `gc` sub-database: blob deletions still to deliver to storage nodes.

Key = not_before (ns, u64 BE) + node id + blob id: a cursor walk from the start finds the due
entries in time order, and an entry is idempotent (deleting twice is harmless). The value is
the inode the blob belonged to (u64 BE), or empty when unknown. The collector does not trust
it: it asks the `blobs` index which file's current blob it is, skips an entry whose file lists
that node for that blob again (a replica re-made on a node that had been dropped from the list
must not be deleted by the old entry) and delivers the others of current blobs under the
file's repair lock (docs/coordinator.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import lmdb

from dfs.db import Database
from dfs.meta.codec import U64x3, k64, unk64


@dataclass(frozen=True, slots=True)
class GcEntry:
    not_before_ns: int
    node: int
    blob: int
    ino: int = field(default=0, compare=False)

    def key(self) -> bytes:
        return U64x3.pack(self.not_before_ns, self.node, self.blob)


class GcQueue:
    def __init__(self, db: Database) -> None:
        self._db = db["gc"]

    def add(self, txn: lmdb.Transaction, not_before_ns: int, node: int, blob: int,
            ino: int = 0) -> GcEntry:
        entry = GcEntry(not_before_ns, node, blob, ino)
        txn.put(entry.key(), k64(ino) if ino else b"", db=self._db)
        return entry

    def due(self, txn: lmdb.Transaction, now_ns: int, limit: int) -> list[GcEntry]:
        """Up to `limit` entries whose grace period is over, oldest first."""
        out: list[GcEntry] = []
        with txn.cursor(db=self._db) as cur:
            if not cur.first():
                return out
            for key, value in cur.iternext(keys=True, values=True):
                entry = _entry(key, value)
                if entry.not_before_ns > now_ns or len(out) >= limit:
                    break
                out.append(entry)
        return out

    def remove(self, txn: lmdb.Transaction, entries: Iterable[GcEntry]) -> int:
        return sum(1 for e in entries if txn.delete(e.key(), db=self._db))

    def postpone(self, txn: lmdb.Transaction, entries: Iterable[GcEntry], not_before_ns: int
                 ) -> None:
        """Move entries for an unreachable node behind the others, so they don't block them."""
        for e in entries:
            if txn.delete(e.key(), db=self._db):
                self.add(txn, not_before_ns, e.node, e.blob, e.ino)

    def all(self, txn: lmdb.Transaction) -> list[GcEntry]:
        with txn.cursor(db=self._db) as cur:
            return [_entry(k, v) for k, v in cur.iternext(keys=True, values=True)]

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]


def _entry(key: bytes, value: bytes) -> GcEntry:
    return GcEntry(*U64x3.unpack(key), unk64(value) if len(value) == 8 else 0)
