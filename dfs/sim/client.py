"""Simulated clients: overwrite files (with and without if_version) and read them back."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dfs.chunks import file_checksum
from dfs.sim.world import Process, World

CHUNK = 4  # bytes: small chunks give multi-chunk files cheaply
RPC_TIMEOUT = 1.0
COMMIT_TIMEOUT = 3.0


@dataclass
class Op:
    """One write as Jepsen records it: invoked, then ok / failed / unknown (:info)."""

    client: str
    ino: int
    content: bytes
    invoked: float
    txid: int | None = None
    outcome: str = "invoked"
    detail: str = ""


@dataclass
class History:
    writes: list[Op] = field(default_factory=list)
    by_txid: dict[int, Op] = field(default_factory=dict)
    reads: int = 0
    deletes: int = 0
    bad_reads: list[str] = field(default_factory=list)


class SimClient(Process):
    crashable = False

    def __init__(self, world: World, name: str, files: list[int], history: History) -> None:
        super().__init__(world, name)
        self.files = files
        self.history = history
        self.rids = itertools.count(1)
        self.waiting: dict[int, Callable[[dict[str, Any] | None], None]] = {}
        self.running = True
        self.after(world.rng.uniform(0, 0.1), self._next)

    def receive(self, src: str, msg: dict[str, Any]) -> None:
        cont = self.waiting.pop(msg.get("rid"), None)
        if cont is not None:
            cont(msg)

    def call(self, dst: str, msg: dict[str, Any], cont: Callable[[dict[str, Any] | None], None],
             timeout: float = RPC_TIMEOUT) -> None:
        rid = next(self.rids)
        self.waiting[rid] = cont
        self.send(dst, {**msg, "rid": rid})

        def expire() -> None:
            if self.waiting.pop(rid, None) is not None:
                cont(None)

        self.after(timeout, expire)

    def _next(self) -> None:
        if not self.running:
            return
        ino = self.world.rng.choice(self.files)
        roll = self.world.rng.random()
        if roll < 0.65:
            self._write(ino)
        elif roll < 0.72:
            self.history.deletes += 1
            self.call("coord", {"op": "delete", "ino": ino}, lambda reply: self._done())
        else:
            self._read(ino)

    def _done(self) -> None:
        self.after(self.world.rng.uniform(0, 0.2), self._next)

    # ---------------------------------------------------------------- writes

    def _write(self, ino: int) -> None:
        rng = self.world.rng
        n = len(self.history.writes)
        content = f"{self.name}#{n}|".encode() * rng.randint(0, 3)
        op = Op(self.name, ino, content, self.world.now)
        self.history.writes.append(op)
        if_version = rng.random() < 0.3

        def got_attr(reply: dict[str, Any] | None) -> None:
            if reply is None:
                return self._finish(op, "failed", "getattr timed out")
            self.call("coord", {"op": "begin", "ino": ino, "base_version": reply["version"],
                                "if_version": if_version}, lambda r: begun(r))

        def begun(reply: dict[str, Any] | None) -> None:
            if reply is None:
                return self._finish(op, "failed", "begin timed out")
            op.txid = reply["txid"]
            self.history.by_txid[op.txid] = op
            chunks = [content[i:i + CHUNK] for i in range(0, len(content), CHUNK)]
            todo = {(r, i) for r in reply["replicas"] for i in range(len(chunks))}
            if not todo:
                return commit(len(chunks))
            for r, i in sorted(todo):
                self.call(f"n{r}", {"op": "stage", "txid": op.txid, "index": i,
                                    "data": chunks[i]}, lambda rep, k=(r, i): staged(rep, k,
                                                                                  todo, chunks))

        def staged(reply: dict[str, Any] | None, key: tuple[int, int], todo: set,
                   chunks: list[bytes]) -> None:
            if op.outcome != "invoked" or key not in todo:
                return
            if reply is None or not reply["ok"]:
                self.send("coord", {"op": "abort", "txid": op.txid})
                return self._finish(op, "failed", "stage failed")
            todo.discard(key)
            if not todo:
                commit(len(chunks))

        def commit(nchunks: int) -> None:
            self.call("coord", {"op": "commit", "txid": op.txid, "size": len(content),
                                "checksum": file_checksum(content), "nchunks": nchunks},
                      committed, COMMIT_TIMEOUT)

        def committed(reply: dict[str, Any] | None) -> None:
            if reply is None:
                self._finish(op, "unknown", "commit timed out")
            elif reply["ok"]:
                self._finish(op, "ok")
            else:
                self._finish(op, "failed", reply["code"])

        self.call("coord", {"op": "getattr", "ino": ino}, got_attr)

    def _finish(self, op: Op, outcome: str, detail: str = "") -> None:
        op.outcome, op.detail = outcome, detail
        self.world.log(f"{self.name} write ino={op.ino} txid={op.txid} {outcome} {detail}")
        self._done()

    # ---------------------------------------------------------------- reads

    def _read(self, ino: int) -> None:
        def got_attr(reply: dict[str, Any] | None) -> None:
            if reply is None or reply["blob"] is None:
                return self._done()
            blob, n = reply["blob"], reply["nchunks"]
            replica = self.world.rng.choice(reply["replicas"])
            parts: list[bytes] = []
            if n == 0:
                return verify(blob, b"")

            def got_chunk(rep: dict[str, Any] | None) -> None:
                if rep is None or not rep["ok"]:
                    return self._done()  # a failed read is allowed; a wrong one is not
                parts.append(rep["data"])
                if len(parts) == n:
                    return verify(blob, b"".join(parts))
                self.call(f"n{replica}", {"op": "read", "blob": blob, "index": len(parts)},
                          got_chunk)

            self.call(f"n{replica}", {"op": "read", "blob": blob, "index": 0}, got_chunk)

        def verify(blob: int, data: bytes) -> None:
            self.history.reads += 1
            op = self.history.by_txid.get(blob)
            if op is None or op.content != data:
                self.history.bad_reads.append(f"{self.name} read ino={ino} blob={blob}: "
                                              f"{data!r} is not what txid {blob} wrote")
            self._done()

        self.call("coord", {"op": "getattr", "ino": ino}, got_attr)
