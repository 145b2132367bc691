"""The `gc` sub-database: blob deletions still to deliver to storage nodes.

Key = not_before (ns, u64 BE) + node id + blob id, value empty: a cursor walk from the start
finds the due entries in time order, and an entry is idempotent (deleting twice is harmless).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import lmdb

from dfs.db import Database
from dfs.meta.codec import U64x3


@dataclass(frozen=True, slots=True)
class GcEntry:
    not_before_ns: int
    node: int
    blob: int

    def key(self) -> bytes:
        return U64x3.pack(self.not_before_ns, self.node, self.blob)


class GcQueue:
    def __init__(self, db: Database) -> None:
        self._db = db["gc"]

    def add(self, txn: lmdb.Transaction, not_before_ns: int, node: int, blob: int) -> GcEntry:
        entry = GcEntry(not_before_ns, node, blob)
        txn.put(entry.key(), b"", db=self._db)
        return entry

    def due(self, txn: lmdb.Transaction, now_ns: int, limit: int) -> list[GcEntry]:
        """Up to `limit` entries whose grace period is over, oldest first."""
        out: list[GcEntry] = []
        with txn.cursor(db=self._db) as cur:
            if not cur.first():
                return out
            for key in cur.iternext(keys=True, values=False):
                entry = GcEntry(*U64x3.unpack(key))
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
                self.add(txn, not_before_ns, e.node, e.blob)

    def all(self, txn: lmdb.Transaction) -> list[GcEntry]:
        with txn.cursor(db=self._db) as cur:
            return [GcEntry(*U64x3.unpack(k)) for k in cur.iternext(keys=True, values=False)]

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]
