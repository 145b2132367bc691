"""The `meta` sub-database: cluster identity, format version, R, the id counters and the
coordinator's incarnation (starts counted).

Counters (next ino, next node id, the txid high-water mark) live here so that every allocation
is part of the same LMDB transaction as the record it allocates for.
"""

from __future__ import annotations

import uuid
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.codec import pack, unpack

FORMAT_VERSION = 1

CLUSTER_ID = b"cluster_id"
FORMAT = b"format_version"
REPLICAS = b"replicas"
NEXT_INO = b"next_ino"
NEXT_NODE_ID = b"next_node_id"
TXID_HWM = b"txid_hwm"
PURGED_HWM = b"purged_hwm"  # the highest txid whose ENDED record was ever purged
BLOB_INDEX = b"blob_index"  # set once the `blobs` index covers every inode
INCARNATION = b"incarnation"


class ClusterMeta:
    """Typed access to the `meta` sub-database."""

    def __init__(self, db: Database) -> None:
        self._db = db["meta"]

    def get(self, txn: lmdb.Transaction, key: bytes, default: Any = None) -> Any:
        raw = txn.get(key, db=self._db)
        return default if raw is None else unpack(raw)

    def put(self, txn: lmdb.Transaction, key: bytes, value: Any) -> None:
        txn.put(key, pack(value), db=self._db)

    def next_counter(self, txn: lmdb.Transaction, key: bytes, first: int) -> int:
        """Return the counter's value and store value + 1 (starting at `first`)."""
        value = self.get(txn, key, first)
        self.put(txn, key, value + 1)
        return value

    def initialize(self, txn: lmdb.Transaction, replicas: int) -> bool:
        """Create the cluster identity at first start; True if it was created now.

        R is fixed at first start: a cluster's files were placed for that R, so a later
        `--replicas` must not silently change it.
        """
        if txn.get(CLUSTER_ID, db=self._db) is not None:
            version = self.get(txn, FORMAT)
            if version != FORMAT_VERSION:
                raise DfsError(
                    Code.EINVAL,
                    f"metadata format version {version}, this dfs reads {FORMAT_VERSION}",
                )
            return False
        if replicas < 1:
            raise DfsError(Code.EINVAL, f"replicas must be at least 1, not {replicas}")
        self.put(txn, CLUSTER_ID, uuid.uuid4().hex)
        self.put(txn, FORMAT, FORMAT_VERSION)
        self.put(txn, REPLICAS, replicas)
        return True

    def next_incarnation(self, txn: lmdb.Transaction) -> int:
        """Count one more start of the coordinator (1 at the first): nodes compare it across
        heartbeats to learn that the coordinator restarted and forgot its open transactions."""
        value = self.get(txn, INCARNATION, 0) + 1
        self.put(txn, INCARNATION, value)
        return value

    def cluster_id(self, txn: lmdb.Transaction) -> str:
        return self.get(txn, CLUSTER_ID)

    def replicas(self, txn: lmdb.Transaction) -> int:
        return self.get(txn, REPLICAS)
