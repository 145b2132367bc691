"""The transaction log (`txns`): commit decisions of presumed-abort 2PC (docs/design.md §5).

Only commits are recorded; a txid without a record is aborted. A record is COMMITTED from the
decision until every replica acked its COMMIT, then ENDED, and an ENDED record is purged after
a retention period (nobody asks about it any more: every replica already knows).

Txids (also the blob ids, so never reused) are leased in blocks: the high-water mark in `meta`
is forced once per block, not once per BEGIN, and a restart continues above it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import lmdb

from dfs.db import Database
from dfs.meta.cluster import PURGED_HWM, TXID_HWM, ClusterMeta
from dfs.meta.codec import k64, pack, unk64, unpack

FIRST_TXID = 1


class TxnState(enum.StrEnum):
    COMMITTED = "COMMITTED"
    ENDED = "ENDED"


@dataclass(slots=True)
class TxnRecord:
    txid: int
    state: TxnState
    ino: int
    replicas: list[int]
    size: int
    checksum: bytes
    base_version: int | None = None
    acked: list[int] = field(default_factory=list)
    decided_ns: int = 0
    ended_ns: int = 0
    # A member of a multi-file transaction: the group's id and every member's txid (the
    # members' records are written in the one LMDB write of the group's decision).
    group: int = 0
    members: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        record = asdict(self)
        del record["txid"]
        if not self.group:  # single-file records stay as they were
            del record["group"], record["members"]
        record["state"] = str(self.state)
        return pack(record)

    @classmethod
    def decode(cls, txid: int, data: bytes) -> TxnRecord:
        record = unpack(data)
        record["state"] = TxnState(record["state"])
        return cls(txid=txid, **record)

    @property
    def unacked(self) -> list[int]:
        return [n for n in self.replicas if n not in self.acked]


class TxnLog:
    def __init__(self, db: Database, meta: ClusterMeta) -> None:
        self._db = db["txns"]
        self._meta = meta

    def lease(self, txn: lmdb.Transaction, count: int) -> tuple[int, int]:
        """Reserve txids [start, end); the caller must make this write durable before use."""
        start = self._meta.get(txn, TXID_HWM, FIRST_TXID)
        self._meta.put(txn, TXID_HWM, start + count)
        return start, start + count

    def record_commit(self, txn: lmdb.Transaction, record: TxnRecord) -> None:
        txn.put(k64(record.txid), record.encode(), db=self._db)

    def get(self, txn: lmdb.Transaction, txid: int) -> TxnRecord | None:
        raw = txn.get(k64(txid), db=self._db)
        return None if raw is None else TxnRecord.decode(txid, raw)

    def ack(self, txn: lmdb.Transaction, txid: int, nodes: Iterable[int], now_ns: int
            ) -> TxnRecord | None:
        """Note replicas' COMMIT acks; the record becomes ENDED once all have acked."""
        record = self.get(txn, txid)
        if record is None or record.state is TxnState.ENDED:
            return record
        for node in nodes:
            if node in record.replicas and node not in record.acked:
                record.acked.append(node)
        if not record.unacked:
            record.state = TxnState.ENDED
            record.ended_ns = now_ns
        self.record_commit(txn, record)
        return record

    def end(self, txn: lmdb.Transaction, txid: int, now_ns: int) -> TxnRecord | None:
        record = self.get(txn, txid)
        if record is None:
            return None
        return self.ack(txn, txid, record.replicas, now_ns)

    def pending(self, txn: lmdb.Transaction) -> list[TxnRecord]:
        """Committed, not ended: COMMIT still owed to some replica (rule 3)."""
        with txn.cursor(db=self._db) as cur:
            records = (TxnRecord.decode(unk64(k), v) for k, v in cur)
            return [r for r in records if r.state is TxnState.COMMITTED]

    def purge_ended(self, txn: lmdb.Transaction, before_ns: int, limit: int) -> int:
        """Delete up to `limit` ENDED records that ended before `before_ns`.

        Walks in txid order (roughly decision order) and stops at the first ENDED record that
        is still too young, so one call costs O(limit + pending) at most.
        """
        doomed: list[bytes] = []
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                record = TxnRecord.decode(unk64(key), value)
                if record.state is TxnState.COMMITTED:
                    continue
                if record.ended_ns >= before_ns or len(doomed) >= limit:
                    break
                doomed.append(key)
        for key in doomed:
            txn.delete(key, db=self._db)
        if doomed:
            # In the same transaction as the deletions: below this mark, "no record" no
            # longer proves an abort (see `may_be_purged`).
            highest = max(unk64(k) for k in doomed)
            if highest > self._meta.get(txn, PURGED_HWM, 0):
                self._meta.put(txn, PURGED_HWM, highest)
        return len(doomed)

    def may_be_purged(self, txn: lmdb.Transaction, txid: int) -> bool:
        """Whether txid's record, had it committed, could already be purged. A writer whose
        commit reply was lost may ask later than the retention: for it, "no record" at or
        below this mark means "unknown", not "aborted" (presumed abort is only safe for
        txids the log can still speak for)."""
        return txid <= self._meta.get(txn, PURGED_HWM, 0)

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]
