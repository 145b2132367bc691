"""Rules checked while a run goes on, from outside every process (god's view of the disks).

The end-of-run checks judge the state a run leaves; some broken rules leave no trace there,
because the rest of the system heals what they break (a repair re-makes a copy a node lost).
These are checked at the moment they must hold, against what each disk has *forced* (a
crash may take the rest):
- rule 2: a node that answers PREPARE with YES, or a STAGE carrying the prepare fields with
  ok (the one-message stage-and-vote), holds the blob PREPARED (or COMMITTED) on its forced
  state;
- rule 5: a node that acks a COMMIT holds the blob COMMITTED on its forced state, for each txid
  a batched COMMIT acks (`acked`; its `refused` ones are no ack). Gone is fine only where
  the node is no longer listed: GC may delete a superseded copy while the ack is on its way;
- nothing observable before it is forced: when the coordinator tells anyone a transaction
  committed (a commit reply, OUTCOME "committed"), its forced state holds that decision;
- rule 5: a decision record that ENDED while its blob is current had every replica the file
  lists acknowledge, so each holds the blob COMMITTED on its forced state (but for a copy the
  world rotted, which a repair may be re-making on the same node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from dfs.meta.codec import k64, unk64
from dfs.sim.lmdb_model import SimDisks
from storage_node.layout import blob_key

if TYPE_CHECKING:
    from dfs.sim.processes import SimCoordinator, SimNode
    from dfs.sim.world import World


class Watcher:
    def __init__(self, world: World, model: SimDisks) -> None:
        self.world = world
        self.model = model
        self.coord: SimCoordinator | None = None
        self.nodes: dict[str, SimNode] = {}
        self.checks = 0

    def _forced(self, path: Any, db: bytes, key: bytes) -> bytes | None:
        disk = self.model.disks.get(str(path))
        if disk is None or db not in disk.stores:
            return None
        return disk.stores[db].value_at(key, disk.forced)

    def _node_state(self, node: SimNode, blob: int) -> str | None:
        raw = self._forced(node.path, b"blobs", blob_key(blob))
        return None if raw is None else msgpack.unpackb(raw, raw=False).get("state")

    def _decided(self, txid: int) -> bool:
        """A forced record of the decision: its txn record, or something that names its blob
        (a current file; a kept version or a snapshot once the record was purged)."""
        assert self.coord is not None
        path = self.coord.path
        return (self._forced(path, b"txns", k64(txid)) is not None
                or self._forced(path, b"blobs", k64(txid)) is not None
                or self._forced_prefix(path, b"retained", k64(txid))
                or self._forced_prefix(path, b"snapheld", k64(txid)))

    def _forced_prefix(self, path: Any, db: bytes, prefix: bytes) -> bool:
        disk = self.model.disks.get(str(path))
        if disk is None or db not in disk.stores:
            return False
        store = disk.stores[db]
        return any(key.startswith(prefix) and store.value_at(key, disk.forced) is not None
                   for key in list(store.keys))

    def _listed(self, node: SimNode, blob: int) -> bool:
        """The coordinator's forced metadata lists `node` for `blob`, the current blob of a
        file (a copy GC may not delete)."""
        assert self.coord is not None
        path = self.coord.path
        ino = self._forced(path, b"blobs", k64(blob))
        inode = None if ino is None else self._forced(path, b"inodes", ino)
        replicas = [] if inode is None else msgpack.unpackb(inode, raw=False).get("replicas")
        return bool(node.node_id) and node.node_id in (replicas or [])

    # ------------------------------------------------------------ at each reply

    def on_reply(self, src: str, dst: str, msg: dict[str, Any], reply: dict[str, Any]) -> None:
        if not reply.get("ok"):
            return
        op = msg.get("op")
        node = self.nodes.get(dst)
        # A STAGE carrying the prepare fields is a vote too: its ok reply is a YES.
        if node is not None and (op == "prepare" or (op == "stage" and "checksum" in msg)):
            self.checks += 1
            state = self._node_state(node, msg["txid"])
            if state not in ("PREPARED", "COMMITTED"):
                self.world.violation(f"rule 2: {dst} voted YES ({op}) for txid {msg['txid']} "
                                     f"with {state or 'nothing'} forced")
        elif op == "commit" and node is not None:
            for txid in _acked(msg, reply):
                self.checks += 1
                state = self._node_state(node, txid)
                if state in ("STAGED", "PREPARED") or (state is None
                                                       and self._listed(node, txid)):
                    self.world.violation(f"rule 5: {dst} acked COMMIT of txid {txid} with "
                                         f"{state or 'nothing'} forced")
        elif dst == "coord" and (op == "commit" or (op == "outcome"
                                                    and reply.get("state") == "committed")):
            self.checks += 1
            if not self._decided(msg["txid"]):
                self.world.violation(f"forced first: coord told {src} txid {msg['txid']} "
                                     f"committed ({op}) before the decision was forced")
        elif dst == "coord" and isinstance(reply.get("attr"), dict):
            blob = reply["attr"].get("blob")
            self.checks += 1
            if blob is not None and not self._decided(blob):
                self.world.violation(f"forced first: coord showed {src} blob {blob} of ino "
                                     f"{reply['attr'].get('ino')} ({op}) before its decision "
                                     "was forced")

    # ------------------------------------------------------------ periodically

    def scan(self) -> None:
        """Rule 5 over every ENDED record the coordinator's disk holds right now."""
        coord = self.coord
        if coord is None:
            return
        disk = self.model.disks.get(str(coord.path))
        if disk is None or b"txns" not in disk.stores or b"inodes" not in disk.stores:
            return
        txns, inodes, blobs = (disk.stores[b"txns"], disk.stores[b"inodes"],
                               disk.stores.get(b"blobs"))
        by_id = {n.node_id: n for n in self.nodes.values() if n.node_id}
        removed = self._removed(disk)
        # A copy the world rotted is dropped by its node and fetched again by a repair that
        # keeps the node listed: until that lands the node holds nothing forced. The judge and
        # the end checks still require the copy back (dfs/sim/invariants.py).
        disks = self.world.disks
        rotted = disks.rotted if disks is not None else set()
        for key in list(txns.keys):
            raw = txns.value_at(key, disk.forced)
            if raw is None:
                continue
            record = msgpack.unpackb(raw, raw=False)
            if record.get("state") != "ENDED" or blobs is None:
                continue
            txid = unk64(key)
            ino_raw = blobs.value_at(k64(txid), disk.forced)
            if ino_raw is None:
                continue  # superseded or gone: its copies may be collected
            inode_raw = inodes.value_at(ino_raw, disk.forced)
            if inode_raw is None:
                continue
            listed = msgpack.unpackb(inode_raw, raw=False).get("replicas") or []
            for node_id in listed:
                node = by_id.get(node_id)
                if node is None or node_id in removed or (node_id, txid) in rotted:
                    continue
                self.checks += 1
                state = self._node_state(node, txid)
                if state != "COMMITTED":
                    self.world.violation(
                        f"rule 5: txid {txid} ENDED while node {node_id} ({node.name}), "
                        f"listed by its file, holds {state or 'nothing'} forced")

    def _removed(self, disk: Any) -> set[int]:
        nodes = disk.stores.get(b"nodes")
        if nodes is None:
            return set()
        out = set()
        for key in nodes.keys:
            raw = nodes.value_at(key, disk.forced)
            if raw is not None and msgpack.unpackb(raw, raw=False).get("state") == "removed":
                out.add(unk64(key))
        return out


def _acked(msg: dict[str, Any], reply: dict[str, Any]) -> list[int]:
    """The txids an ok reply to a node's COMMIT acks: the one `txid`, or a batch's `acked`."""
    if "txids" in msg:
        return [t for t in reply.get("acked") or [] if isinstance(t, int)]
    return [msg["txid"]] if isinstance(msg.get("txid"), int) else []
