"""The simulated storage node: the real Participant over a SimDisk blob store."""

from __future__ import annotations

from typing import Any

from dfs.chunks import file_checksum
from dfs.errors import Code
from dfs.sim.disk import SimDisk
from dfs.sim.world import Process, World
from storage_node.participant import (
    AskOutcome,
    Drop,
    ForceCommitted,
    ForcePrepared,
    Participant,
    Refuse,
    StoreChunk,
)

TICK = 0.25
OUTCOME_WAIT = 1.0


class SimNode(Process):
    """Durable: ("blob", txid) -> record, ("chunk", txid, i) -> bytes.

    bug="vote_before_force" plants a bug: YES is sent before PREPARED is forced.
    """

    def __init__(self, world: World, name: str, node_id: int, bug: str | None = None) -> None:
        super().__init__(world, name)
        self.node_id = node_id
        self.bug = bug
        self.disk = SimDisk()
        self.full_until = 0.0  # the world fills this node's disk for a while
        self._boot()

    def _boot(self) -> None:
        self.p = Participant(staged_timeout=20.0, outcome_after=2.0, outcome_retry_max=2.0)
        for key in self.disk.keys():
            if key[0] == "blob":
                rec = self.disk.get(key)
                self.p.restore(key[1], rec["state"], rec["created"], self.world.now)
        self.after(TICK, self._tick)

    def crash(self) -> None:
        super().crash()
        self.disk.crash()

    def restart(self) -> None:
        super().restart()
        self._boot()

    def stored(self, txid: int) -> str | None:
        rec = self.disk.get(("blob", txid))
        return rec["state"] if rec else None

    def blobs(self) -> dict[int, dict[str, Any]]:
        """Every blob record the running node sees (for the checker)."""
        return {k[1]: self.disk.get(k) for k in self.disk.keys() if k[0] == "blob"}

    def content(self, txid: int) -> bytes | None:
        rec = self.disk.get(("blob", txid))
        if rec is None or rec.get("nchunks") is None:
            return None
        parts = [self.disk.get(("chunk", txid, i)) for i in range(rec["nchunks"])]
        return None if any(p is None for p in parts) else b"".join(parts)

    # ---------------------------------------------------------------- messages

    def receive(self, src: str, msg: dict[str, Any]) -> None:
        getattr(self, "on_" + (msg.get("op") or "re_" + msg["re"]))(src, msg)

    def reply(self, dst: str, msg: dict[str, Any], re: str, error: Refuse | None = None,
              **fields: Any) -> None:
        out = {"re": re, "rid": msg.get("rid"), "txid": msg.get("txid"), "node": self.node_id,
               "ok": error is None, **fields}
        if error is not None:
            out.update(code=error.code.value, msg=error.msg)
        self.send(dst, out)

    def on_stage(self, src: str, msg: dict[str, Any]) -> None:
        txid = msg["txid"]
        a = self.p.on_stage(txid, self.stored(txid), self.world.now)
        if isinstance(a, Refuse):
            return self.reply(src, msg, "stage", a)
        assert isinstance(a, StoreChunk)
        if self.world.now < self.full_until:
            return self.reply(src, msg, "stage", Refuse(Code.ENOSPC, "disk full"))
        if self.stored(txid) is None:
            self.disk.put(("blob", txid), {"state": "STAGED", "created": self.world.now})
        self.disk.put(("chunk", txid, msg["index"]), msg["data"])
        if isinstance(self.p.on_staged(txid), Drop):
            self._drop(txid)
        self.crash_point("node.after_stage")
        self.reply(src, msg, "stage")

    def on_prepare(self, src: str, msg: dict[str, Any]) -> None:
        txid, stored = msg["txid"], self.stored(msg["txid"])
        a = self.p.on_prepare(txid, stored, msg["nchunks"])
        if isinstance(a, Refuse):
            return self.reply(src, msg, "prepare", a)
        assert isinstance(a, ForcePrepared)
        problem = self._verify(txid, stored, msg)
        if problem is not None:
            self.p.on_prepare_failed(txid, self.world.now)
            return self.reply(src, msg, "prepare", problem)
        if stored not in ("PREPARED", "COMMITTED"):
            if self.world.now < self.full_until:
                self.p.on_prepare_failed(txid, self.world.now)
                return self.reply(src, msg, "prepare", Refuse(Code.ENOSPC, "disk full"))
            rec = self.disk.get(("blob", txid)) or {"created": self.world.now}
            self.disk.put(("blob", txid), {**rec, "state": "PREPARED", "size": msg["size"],
                                           "checksum": msg["checksum"],
                                           "nchunks": msg["nchunks"]})
            if self.bug != "vote_before_force":
                self.disk.force()
        self.crash_point("node.before_vote")
        self.p.on_prepared(txid, self.world.now)
        self.reply(src, msg, "prepare")

    def _verify(self, txid: int, stored: str | None, msg: dict[str, Any]) -> Refuse | None:
        if stored in ("PREPARED", "COMMITTED"):
            rec = self.disk.get(("blob", txid))
            if rec["checksum"] != msg["checksum"] or rec["size"] != msg["size"]:
                return Refuse(Code.CONFLICT, "prepared with other content")
            return None
        parts = [self.disk.get(("chunk", txid, i)) for i in range(msg["nchunks"])]
        if any(p is None for p in parts):
            return Refuse(Code.ENOENT, "missing chunks")
        data = b"".join(parts)
        if len(data) != msg["size"] or file_checksum(data) != msg["checksum"]:
            return Refuse(Code.CHECKSUM, "checksum mismatch")
        return None

    def on_commit(self, src: str, msg: dict[str, Any]) -> None:
        txid = msg["txid"]
        a = self.p.on_commit(txid, self.stored(txid))
        if isinstance(a, Refuse):
            return self.reply(src, msg, "commit", a)
        if isinstance(a, ForceCommitted):
            self._force_committed(txid)
            self.crash_point("node.before_commit_ack")
        self.reply(src, msg, "commit")

    def _force_committed(self, txid: int) -> None:
        rec = self.disk.get(("blob", txid))
        if rec is None:  # deleted by GC meanwhile: it was committed and superseded
            self.p.on_committed(txid)
            return
        self.disk.put(("blob", txid), {**rec, "state": "COMMITTED"})
        self.disk.force()
        self.p.on_committed(txid)

    def on_abort(self, src: str, msg: dict[str, Any]) -> None:
        a = self.p.on_abort(msg["txid"], self.stored(msg["txid"]))
        if isinstance(a, Drop):
            self._drop(msg["txid"])

    def on_gc_delete(self, src: str, msg: dict[str, Any]) -> None:
        """The coordinator's GC: the blob was superseded; delete it in whatever state."""
        self._drop(msg["txid"], committed_too=True)
        self.disk.force()  # the coordinator forgets the deletion once acked
        self.p.on_deleted(msg["txid"])
        self.reply(src, msg, "gc_delete")

    def _drop(self, txid: int, committed_too: bool = False) -> None:
        rec = self.disk.get(("blob", txid))
        if rec is None or (rec["state"] == "COMMITTED" and not committed_too):
            return
        for key in self.disk.keys():
            if key[0] == "chunk" and key[1] == txid:
                self.disk.delete(key)
        self.disk.delete(("blob", txid))

    def on_read(self, src: str, msg: dict[str, Any]) -> None:
        txid, index = msg["blob"], msg["index"]
        data = self.disk.get(("chunk", txid, index))
        if self.stored(txid) not in ("PREPARED", "COMMITTED") or data is None:
            return self.reply(src, msg, "read", Refuse(Code.ENOENT, "no such blob"))
        self.reply(src, msg, "read", data=data)

    def on_re_outcome(self, src: str, msg: dict[str, Any]) -> None:
        txid = msg["txid"]
        a = self.p.on_outcome(txid, msg["state"], self.world.now)
        if isinstance(a, ForceCommitted):
            self._force_committed(txid)
        elif isinstance(a, Drop):
            self._drop(txid)

    def _tick(self) -> None:
        for a in self.p.on_tick(self.world.now):
            if isinstance(a, Drop):
                self._drop(a.txid)
            elif isinstance(a, AskOutcome):
                self.send("coord", {"op": "outcome", "txid": a.txid})
                self.after(OUTCOME_WAIT, self.p.on_outcome_failed, a.txid, self.world.now
                           + OUTCOME_WAIT)
        self.after(TICK, self._tick)
