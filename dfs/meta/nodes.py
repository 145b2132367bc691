"""The node table (`nodes`): storage nodes the cluster knows, by coordinator-assigned id.

Persisted state is the administrative one: up, draining or removed. "down" is a liveness
verdict (no heartbeat lately) that the coordinator derives in memory and reports, never stores:
after a coordinator restart every node is down until it is heard from again.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.cluster import NEXT_NODE_ID, ClusterMeta
from dfs.meta.codec import k64, pack, unk64, unpack

FIRST_NODE_ID = 1


class NodeState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    REMOVED = "removed"


@dataclass(slots=True)
class NodeRecord:
    id: int
    address: str
    state: NodeState = NodeState.UP
    capacity: int = 0
    used: int = 0
    last_seen_ns: int = 0
    token: str = ""  # the node store's own random identity (storage_node/layout.py)

    def encode(self) -> bytes:
        record = asdict(self)
        del record["id"]
        record["state"] = str(self.state)
        return pack(record)

    @classmethod
    def decode(cls, node_id: int, data: bytes) -> NodeRecord:
        record = unpack(data)
        record["state"] = NodeState(record["state"])
        return cls(id=node_id, **record)


class NodeTable:
    def __init__(self, db: Database, meta: ClusterMeta) -> None:
        self._db = db["nodes"]
        self._meta = meta

    def register(self, txn: lmdb.Transaction, node_id: int, address: str, capacity: int,
                 used: int, now_ns: int, token: str = "") -> NodeRecord:
        """A node (re)joins. Id 0 asks for a new id; a known id keeps it (its address may have
        changed); an unknown non-zero id is adopted so a node outlives a lost node table.
        Id 0 with a token already on record is a register whose reply was lost: the same id
        again (without it, one node held two ids, and the ghost one got placements)."""
        known = next((r for r in self.all(txn) if token and r.token == token), None)
        if node_id == 0 and known is not None:
            if known.state is NodeState.REMOVED:
                raise DfsError(Code.EPERM, f"node {known.id} was removed from the cluster")
            node_id = known.id
        if node_id == 0:
            node_id = self._meta.next_counter(txn, NEXT_NODE_ID, FIRST_NODE_ID)
            record = NodeRecord(node_id, address)
        else:
            found = self.get(txn, node_id)
            if found is not None and found.state is NodeState.REMOVED:
                raise DfsError(Code.EPERM, f"node {node_id} was removed from the cluster")
            record = found or NodeRecord(node_id, address)
            if self._meta.get(txn, NEXT_NODE_ID, FIRST_NODE_ID) <= node_id:
                self._meta.put(txn, NEXT_NODE_ID, node_id + 1)
        record.address = address
        record.token = token or record.token
        record.capacity = capacity
        record.used = used
        record.last_seen_ns = now_ns
        self.put(txn, record)
        return record

    def get(self, txn: lmdb.Transaction, node_id: int) -> NodeRecord | None:
        raw = txn.get(k64(node_id), db=self._db)
        return None if raw is None else NodeRecord.decode(node_id, raw)

    def put(self, txn: lmdb.Transaction, record: NodeRecord) -> None:
        txn.put(k64(record.id), record.encode(), db=self._db)

    def all(self, txn: lmdb.Transaction) -> list[NodeRecord]:
        with txn.cursor(db=self._db) as cur:
            return [NodeRecord.decode(unk64(k), v) for k, v in cur]

    def set_state(self, txn: lmdb.Transaction, node_id: int, state: NodeState) -> NodeRecord:
        if state is NodeState.DOWN:
            raise DfsError(Code.EINVAL, "down is derived from heartbeats, not stored")
        record = self.get(txn, node_id)
        if record is None:
            raise DfsError(Code.ENOENT, f"no node {node_id}")
        if record.state is NodeState.REMOVED and state is not NodeState.REMOVED:
            raise DfsError(Code.EPERM, f"node {node_id} was removed from the cluster")
        record.state = state
        self.put(txn, record)
        return record

    def update_usage(self, txn: lmdb.Transaction, node_id: int, capacity: int, used: int,
                     now_ns: int) -> None:
        record = self.get(txn, node_id)
        if record is not None:
            record.capacity, record.used, record.last_seen_ns = capacity, used, now_ns
            self.put(txn, record)
