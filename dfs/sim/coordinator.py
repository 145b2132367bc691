"""The simulated coordinator: the real CommitProtocol over a SimDisk log and namespace."""

from __future__ import annotations

from typing import Any

from dfs.errors import Code
from dfs.sim.disk import SimDisk
from dfs.sim.world import Process, World
from dfs.twopc import (
    Action,
    CommitProtocol,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendCommit,
    SendPrepare,
    WriteDecision,
    WriteEnd,
)

VOTE_TIMEOUT = 1.0
COMMIT_RETRY = 0.5
STAGING_TIMEOUT = 10.0
GC_GRACE = 2.0
GC_INTERVAL = 0.5


class SimCoordinator(Process):
    """Durable: ("txn", txid), ("inode", ino), ("gc", node, blob) -> not_before, ("next_txid",).
    Memory: the protocol machine. `ledger` is the world's record of every decision the
    coordinator ever made durable (outside the process: the checker's, not the coordinator's).

    bug="unforced_decision" plants a bug: the decision is not forced before the client hears ok.
    """

    def __init__(self, world: World, nodes: dict[int, str], replicas: int, files: list[int],
                 bug: str | None = None) -> None:
        super().__init__(world, "coord")
        self.nodes = nodes
        self.r = replicas
        self.bug = bug
        self.disk = SimDisk()
        self.ledger: dict[int, int] = {}  # txid -> ino, for every decision forced
        for ino in files:
            self.disk.put(("inode", ino), {"version": 0, "blob": None, "replicas": [],
                                           "size": 0, "checksum": None, "nchunks": 0})
        self.disk.put(("next_txid",), 1)
        self.disk.force()
        self._boot()

    def _boot(self) -> None:
        self.proto = CommitProtocol()
        self.pending: dict[int, dict[str, Any]] = {}
        for key in self.disk.keys():
            if key[0] == "txn" and self.disk.get(key)["state"] == "COMMITTED":
                rec = self.disk.get(key)
                self.apply(self.proto.recover(key[1], rec["replicas"], rec["acked"]))
        self.recover_timers()
        self.after(GC_INTERVAL, self._collect)

    def crash(self) -> None:
        super().crash()
        self.disk.crash()

    def restart(self) -> None:
        super().restart()
        self._boot()

    # ---------------------------------------------------------------- messages

    def receive(self, src: str, msg: dict[str, Any]) -> None:
        getattr(self, "on_" + (msg.get("op") or "re_" + msg["re"]))(src, msg)

    def on_getattr(self, src: str, msg: dict[str, Any]) -> None:
        self.send(src, {"re": "getattr", "rid": msg["rid"], "ok": True,
                        **self.disk.get(("inode", msg["ino"]))})

    def on_begin(self, src: str, msg: dict[str, Any]) -> None:
        txid = self.disk.get(("next_txid",))
        self.disk.put(("next_txid",), txid + 1)
        self.disk.force()
        replicas = sorted(self.world.rng.sample(sorted(self.nodes), self.r))
        self.proto.begin(txid, replicas)
        self.pending[txid] = {"ino": msg["ino"], "base": msg["base_version"],
                              "if_version": msg["if_version"]}
        self.after(STAGING_TIMEOUT, self._expire, txid)
        self.send(src, {"re": "begin", "rid": msg["rid"], "ok": True, "txid": txid,
                        "replicas": replicas})

    def _expire(self, txid: int) -> None:
        self.apply(self.proto.abort(txid, "expired"))

    def on_commit(self, src: str, msg: dict[str, Any]) -> None:
        txid = msg["txid"]
        info = self.pending.setdefault(txid, {})
        info.update(client=src, rid=msg["rid"], size=msg["size"], checksum=msg["checksum"],
                    nchunks=msg["nchunks"])
        self.crash_point("coordinator.before_prepare")
        self.apply(self.proto.request_commit(txid, msg["size"], msg["checksum"], msg["nchunks"]))
        self.after(VOTE_TIMEOUT, lambda: self.apply(self.proto.vote_timeout(txid)))

    def on_abort(self, src: str, msg: dict[str, Any]) -> None:
        self.apply(self.proto.abort(msg["txid"]))

    def on_delete(self, src: str, msg: dict[str, Any]) -> None:
        """Unlink, modelled as the file's content going away: a new version with no blob."""
        inode = self.disk.get(("inode", msg["ino"]))
        self._supersede(inode)
        self.disk.put(("inode", msg["ino"]), {**inode, "version": inode["version"] + 1,
                                              "blob": None, "replicas": [], "size": 0,
                                              "checksum": None, "nchunks": 0})
        self.disk.force()
        self.send(src, {"re": "delete", "rid": msg["rid"], "ok": True})

    def _supersede(self, inode: dict[str, Any]) -> None:
        """Queue the old blob for deletion after the grace period (in the caller's write)."""
        if inode["blob"] is not None:
            for node in inode["replicas"]:
                self.disk.put(("gc", node, inode["blob"]), self.world.now + GC_GRACE)

    def _collect(self) -> None:
        for key in self.disk.keys():
            if key[0] == "gc" and self.disk.get(key) <= self.world.now:
                self.send(self.nodes[key[1]], {"op": "gc_delete", "txid": key[2]})
        self.after(GC_INTERVAL, self._collect)

    def on_re_gc_delete(self, src: str, msg: dict[str, Any]) -> None:
        self.disk.delete(("gc", msg["node"], msg["txid"]))  # unforced: a lost delete is re-sent

    def on_outcome(self, src: str, msg: dict[str, Any]) -> None:
        txid = msg["txid"]
        rec = self.disk.get(("txn", txid))
        state = "committed" if rec else "inflight" if self.proto.is_in_flight(txid) else "aborted"
        self.send(src, {"re": "outcome", "txid": txid, "state": state})

    def on_re_prepare(self, src: str, msg: dict[str, Any]) -> None:
        node = msg["node"]
        if msg["ok"]:
            self.apply(self.proto.vote(msg["txid"], node, True))
        else:
            self.apply(self.proto.vote(msg["txid"], node, False, Code(msg["code"]), msg["msg"]))

    def on_re_commit(self, src: str, msg: dict[str, Any]) -> None:
        if msg["ok"]:
            rec = self.disk.get(("txn", msg["txid"]))
            if rec and msg["node"] not in rec["acked"]:
                rec = {**rec, "acked": [*rec["acked"], msg["node"]]}
                self.disk.put(("txn", msg["txid"]), rec)  # unforced: losing it only re-sends
            self.apply(self.proto.commit_acked(msg["txid"], msg["node"]))

    # ---------------------------------------------------------------- actions

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendPrepare):
                self.send(self.nodes[a.node], {"op": "prepare", "txid": a.txid, "size": a.size,
                                               "checksum": a.checksum, "nchunks": a.nchunks})
            elif isinstance(a, SendCommit):
                self.send(self.nodes[a.node], {"op": "commit", "txid": a.txid})
                self.crash_point("coordinator.mid_commit")
            elif isinstance(a, SendAbort):
                self.send(self.nodes[a.node], {"op": "abort", "txid": a.txid})
            elif isinstance(a, WriteDecision):
                self._decide(a.txid)
            elif isinstance(a, WriteEnd):
                rec = self.disk.get(("txn", a.txid))
                self.disk.put(("txn", a.txid), {**rec, "state": "ENDED"})
                self.apply(self.proto.end_written(a.txid))
            elif isinstance(a, ReplyOk | ReplyError):
                self._reply(a)

    def _decide(self, txid: int) -> None:
        """The commit point: the record and the inode switch in one forced write (rule 1)."""
        info = self.pending[txid]
        inode = self.disk.get(("inode", info["ino"]))
        if info["if_version"] and inode["version"] != info["base"]:
            msg = f"file is at version {inode['version']}, not {info['base']}"
            self.apply(self.proto.decision_refused(txid, Code.CONFLICT, msg))
            return
        self.crash_point("coordinator.before_decision")
        replicas = list(self.proto.replicas(txid))
        self._supersede(inode)
        self.disk.put(("txn", txid), {"state": "COMMITTED", "ino": info["ino"],
                                      "replicas": replicas, "acked": []})
        self.disk.put(("inode", info["ino"]), {
            "version": inode["version"] + 1, "blob": txid, "replicas": replicas,
            "size": info["size"], "checksum": info["checksum"], "nchunks": info["nchunks"]})
        if self.bug != "unforced_decision":
            self.disk.force()
        self.ledger[txid] = info["ino"]
        self.crash_point("coordinator.after_decision")
        self.apply(self.proto.decision_written(txid))
        self.after(COMMIT_RETRY, self._retry_commit, txid)

    def _retry_commit(self, txid: int) -> None:
        if self.proto.phase(txid) is Phase.COMMITTING:
            self.apply(self.proto.commit_retry(txid))
            self.after(COMMIT_RETRY, self._retry_commit, txid)

    def _reply(self, a: ReplyOk | ReplyError) -> None:
        info = self.pending.pop(a.txid, None)
        if info is None or "client" not in info:
            return
        if isinstance(a, ReplyOk):
            self.send(info["client"], {"re": "commit", "rid": info["rid"], "ok": True})
        else:
            self.send(info["client"], {"re": "commit", "rid": info["rid"], "ok": False,
                                       "code": a.code.value, "msg": a.msg})

    def recover_timers(self) -> None:
        """After a restart, every recovered txid needs its COMMIT retry timer."""
        for txid, phase, _, _ in self.proto.transactions():
            if phase is Phase.COMMITTING:
                self.after(COMMIT_RETRY, self._retry_commit, txid)
