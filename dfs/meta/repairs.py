"""The `repairs` sub-database: bad replicas reported by readers and node scrubs, still to fix.

Key = node id + blob id (u64 BE each), value = msgpack {ino, reason, source, reported_ns,
attempts, not_before_ns}. A report is persisted before it is acknowledged, so a coordinator
restart does not forget a replica a reader found rotten; the coordinator's repair worker takes
entries off once the replica is fixed, found good after all, or the file moved on. `ino` is 0
when the reporter knew only the blob (a node's scrub); the worker resolves it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import lmdb

from dfs.db import Database
from dfs.meta.codec import U64x2, pack, unpack


@dataclass(slots=True)
class RepairEntry:
    node: int
    blob: int
    ino: int = 0
    reason: str = ""
    source: str = ""  # "client" (a read), "scrub" (a node's background verification)
    reported_ns: int = 0
    attempts: int = 0
    not_before_ns: int = 0  # retry no earlier than this (after a failed attempt)

    def key(self) -> bytes:
        return U64x2.pack(self.node, self.blob)

    def encode(self) -> bytes:
        record = asdict(self)
        del record["node"], record["blob"]
        return pack(record)

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> RepairEntry:
        node, blob = U64x2.unpack(key)
        record = unpack(value)
        names = cls.__dataclass_fields__
        return cls(node=node, blob=blob, **{k: v for k, v in record.items() if k in names})


class RepairQueue:
    def __init__(self, db: Database) -> None:
        self._db = db["repairs"]

    def add(self, txn: lmdb.Transaction, entry: RepairEntry) -> RepairEntry:
        """Queue a report; a repeated report of the same replica refreshes it (keeps attempts)."""
        old = self.get(txn, entry.node, entry.blob)
        if old is not None:
            entry.attempts = old.attempts
            entry.ino = entry.ino or old.ino
        txn.put(entry.key(), entry.encode(), db=self._db)
        return entry

    def put(self, txn: lmdb.Transaction, entry: RepairEntry) -> None:
        txn.put(entry.key(), entry.encode(), db=self._db)

    def get(self, txn: lmdb.Transaction, node: int, blob: int) -> RepairEntry | None:
        key = U64x2.pack(node, blob)
        raw = txn.get(key, db=self._db)
        return None if raw is None else RepairEntry.decode(key, raw)

    def remove(self, txn: lmdb.Transaction, node: int, blob: int) -> bool:
        return txn.delete(U64x2.pack(node, blob), db=self._db)

    def page(self, txn: lmdb.Transaction, limit: int) -> list[RepairEntry]:
        with txn.cursor(db=self._db) as cur:
            out: list[RepairEntry] = []
            for key, value in cur:
                if len(out) >= limit:
                    break
                out.append(RepairEntry.decode(key, value))
            return out

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]
