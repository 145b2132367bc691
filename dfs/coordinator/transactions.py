"""Bookkeeping for transactions between BEGIN and the decision: what the client asked for,
and the txid allocator that leases ids in blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from dfs import runtime
from dfs.errors import DfsError
from dfs.meta import MetaStore


@dataclass(eq=False)
class OpenTxn:
    """A transaction of this incarnation that is not decided yet (presumed abort: all of this
    is memory; a crash forgets it and so aborts it)."""

    txid: int
    ino: int
    base_version: int | None
    if_version: bool
    replicas: list[int]
    begun: float = field(default_factory=trio.current_time)
    begun_ns: int = field(default_factory=runtime.wall_ns)
    last_active: float = field(default_factory=trio.current_time)
    # Set by COMMIT:
    size: int = 0
    checksum: bytes = b""
    nchunks: int = 0
    mtime_ns: int | None = None
    committing: bool = False
    commit_asked: float = 0.0  # trio time of the COMMIT (commit latency, dfs.metrics)
    # The reply every COMMIT request for this txid gets (a retried COMMIT waits for it too).
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | DfsError | None = None
    # Expiry: a probe of the replicas is running / what it saw last time.

    def touch(self) -> None:
        self.last_active = trio.current_time()

    def answer(self, result: dict[str, Any] | DfsError) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    async def wait(self) -> dict[str, Any]:
        await self.done.wait()
        if isinstance(self.result, DfsError):
            raise self.result
        assert self.result is not None
        return self.result


class TxidAllocator:
    """Hands out txids from a durably leased block, so BEGIN forces nothing (one forced write
    per `block` BEGINs); a restart leases above the stored high-water mark, never reusing."""

    def __init__(self, store: MetaStore, block: int) -> None:
        self.store = store
        self.block = block
        self._next = 0
        self._end = 0
        self._lock = trio.Lock()

    async def allocate(self) -> int:
        txnlog = self.store.txnlog
        while self._next >= self._end:
            async with self._lock:
                if self._next >= self._end:
                    self._next, self._end = await self.store.db.write(
                        lambda txn: txnlog.lease(txn, self.block))
        txid = self._next
        self._next += 1
        return txid
