"""Re-replication: move every replica off nodes that are draining, removed, or down too long.

A node is evacuated when an operator drains or removes it, or when it has been silent for
`--rereplicate-after` seconds. A round walks the inode table in pages (the event loop stays
free between them), collects the files with a replica on an evacuated node or with fewer than
R replicas listed, and repairs each with `Replicator.fix` (its own transaction), many at once.
A node with nothing left is "clean" until its state changes; a round starts at once when an
operator drains or removes a node, else every few seconds while work is left, and a full
sweep for under-replicated files runs every `SWEEP_INTERVAL`. A round whose repairs failed is
retried with backoff (`BUSY_INTERVAL` doubling to `RETRY_MAX`) even when no evacuated node
waits on it: a file short of replicas after a repair failed (say, right after a restart,
before the nodes have reported) must not wait for the next sweep.

Progress is kept for `dfs status` (files done / to do, files per second, replicas left on each
evacuated node) and for `dfs node drain|remove`, which wait for the node to be clean.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from dfs.meta import MetaStore, NodeState

from .config import CoordinatorConfig
from .membership import Membership
from .replicate import Replicator

log = logging.getLogger(__name__)

PAGE = 2000
BUSY_INTERVAL = 1.0  # look again this soon while an evacuated node is not clean
IDLE_INTERVAL = 5.0
SWEEP_INTERVAL = 600.0
RETRY_MAX = 60.0  # the longest wait before a round that had failed repairs is tried again
CONCURRENCY = 48


@dataclass
class NodeProgress:
    reason: str  # draining | removed | down
    remaining: int = 0  # replicas still on it (as of the last round's walk, minus moved ones)
    found: int = 0  # replicas the last round's walk found on it
    failed: int = 0  # files of it that could not be moved in the last round
    rounds: int = 0  # rounds that have covered it since it became evacuated
    clean: bool = False


@dataclass
class Progress:
    rounds: int = 0
    active: bool = False
    total: int = 0
    done: int = 0
    failed: int = 0
    started: float = 0.0
    finished: float = 0.0
    last_error: str = ""
    nodes: dict[int, NodeProgress] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        now = trio.current_time()
        elapsed = ((now if self.active else self.finished) - self.started) if self.started else 0
        return {
            "active": self.active, "rounds": self.rounds, "total": self.total,
            "done": self.done, "failed": self.failed, "elapsed_s": round(elapsed, 3),
            "files_per_s": round(self.done / elapsed, 1) if elapsed > 0 else 0.0,
            "last_error": self.last_error,
            "nodes": [{"id": n, "reason": p.reason, "remaining": p.remaining, "found": p.found,
                       "failed": p.failed, "rounds": p.rounds, "clean": p.clean}
                      for n, p in sorted(self.nodes.items())],
        }


class ReReplicator:
    def __init__(self, store: MetaStore, membership: Membership, replicator: Replicator,
                 config: CoordinatorConfig) -> None:
        self.store = store
        self.membership = membership
        self.replicator = replicator
        self.after = config.rereplicate_after
        self.progress = Progress()
        self._wake = trio.Event()
        self._since = 0.0
        self._next_sweep = 0.0
        self._retry_at: float | None = None  # a round had failed repairs: try again then
        self._retry_delay = BUSY_INTERVAL

    def wake(self) -> None:
        """An operator drained or removed a node: start a round now."""
        self._wake.set()

    def evacuees(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for node, record in self.membership.nodes.items():
            if record.state is NodeState.REMOVED:
                out[node] = "removed"
            elif record.state is NodeState.DRAINING:
                out[node] = "draining"
            elif (not self.membership.is_live(node)
                  and self.membership.silent_for(node, self._since) >= self.after):
                out[node] = "down"
        return out

    async def run(self) -> None:
        self._since = trio.current_time()
        self._next_sweep = self._since + min(SWEEP_INTERVAL, max(self.after, 60.0))
        while True:
            evac = self.evacuees()
            nodes = self.progress.nodes
            for node in list(nodes):  # back up, or a new reason: forget what we knew
                if evac.get(node) != nodes[node].reason:
                    del nodes[node]
            for node, reason in evac.items():
                nodes.setdefault(node, NodeProgress(reason))
            pending = {n for n, p in nodes.items() if not p.clean}
            now = trio.current_time()
            sweep = now >= self._next_sweep
            retry = self._retry_at is not None and now >= self._retry_at
            if pending or sweep or retry:
                failed = await self.round(evac, pending)
                if sweep:
                    self._next_sweep = trio.current_time() + SWEEP_INTERVAL
                self._schedule_retry(failed, retry)
            interval = BUSY_INTERVAL if any(not p.clean for p in nodes.values()) \
                else IDLE_INTERVAL
            if self._retry_at is not None:
                interval = max(0.0, min(interval, self._retry_at - trio.current_time()))
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()

    def _schedule_retry(self, failed: int, was_retry: bool) -> None:
        if not failed:
            self._retry_at, self._retry_delay = None, BUSY_INTERVAL
            return
        if was_retry:
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        self._retry_at = trio.current_time() + self._retry_delay

    async def round(self, evac: dict[int, str], pending: set[int]) -> int:
        """One walk over the inodes and the repair of every file that needs one; how many of
        those repairs failed."""
        # A write placed on a node before it was drained may commit onto it after the walk
        # below read its inode: the node is not clean while such a write was open at the start
        # (no new write is placed on an evacuated node, so the next round settles it).
        placed = {n for txn in self.replicator.driver.open.values() for n in txn.replicas}
        todo, remaining = await self._collect(evac)
        p = self.progress
        for node in pending:
            if node in p.nodes:
                p.nodes[node].remaining = p.nodes[node].found = remaining.get(node, 0)
                p.nodes[node].failed = 0
        if todo:
            log.info("re-replication: %d files to repair (evacuating %s)", len(todo),
                     {n: evac[n] for n in sorted(evac)})
            p.active, p.total, p.done, p.failed = True, len(todo), 0, 0
            p.started = trio.current_time()
            limit = trio.Semaphore(CONCURRENCY)
            try:
                async with trio.open_nursery() as nursery:
                    for ino, blob, hit in todo:
                        await limit.acquire()
                        nursery.start_soon(self._one, limit, ino, blob, hit, evac)
            finally:
                p.active = False
                p.finished = trio.current_time()
                p.rounds += 1
                log.info("re-replication round: %d done, %d failed in %.1f s", p.done,
                         p.failed, p.finished - p.started)
        for node in pending:
            if node in p.nodes:
                progress = p.nodes[node]
                progress.rounds += 1
                progress.clean = (progress.remaining == 0 and progress.failed == 0
                                  and node not in placed)
                if progress.clean:
                    log.info("node %d (%s) holds no replica any more", node, progress.reason)
        return p.failed if todo else 0

    async def _collect(self, evac: dict[int, str]
                       ) -> tuple[list[tuple[int, int, list[int]]], Counter[int]]:
        todo: dict[tuple[int, int], list[int]] = {}  # (ino, blob): its copies on evac nodes
        scan = self.store.scan
        after = 0
        while True:
            page = self.store.db.read(lambda t, a=after: scan.inodes(t, a, PAGE))
            if not page:
                break
            after = page[-1].ino
            for inode in page:
                if inode.is_reg and inode.blob is not None:
                    self._consider(inode.ino, inode.blob, inode.replicas, evac, todo)
            await trio.sleep(0)
        # Retained versions (docs/coordinator.md, "Version history") hold copies too. A
        # restored version's blob is current and retained at once: one repair fixes both.
        await self._walk(scan.versions, evac, todo)
        # And snapshots' copies of files (a deleted file lives on in a snapshot).
        await self._walk(self.store.namespace.snapshots.files, evac, todo)
        remaining: Counter[int] = Counter()
        for hit in todo.values():
            remaining.update(hit)
        return [(ino, blob, hit) for (ino, blob), hit in todo.items()], remaining

    async def _walk(self, pages: Any, evac: dict[int, str],
                    todo: dict[tuple[int, int], list[int]]) -> None:
        """Every record a keyed, paged table yields (kept versions, snapshots' files)."""
        key = b""
        while True:
            rows, next_key = self.store.db.read(lambda t, k=key: pages(t, k, PAGE))
            for row in rows:
                if row.blob is not None:
                    self._consider(row.ino, row.blob, row.replicas, evac, todo)
            await trio.sleep(0)
            if next_key is None:
                return
            key = next_key

    def _consider(self, ino: int, blob: int, replicas: list[int], evac: dict[int, str],
                  todo: dict[tuple[int, int], list[int]]) -> None:
        hit = [n for n in replicas if n in evac]
        if (hit or len(set(replicas)) < self.store.replicas) and (ino, blob) not in todo:
            todo[(ino, blob)] = hit

    async def _one(self, limit: trio.Semaphore, ino: int, blob: int, hit: list[int],
                   evac: dict[int, str]) -> None:
        try:
            down = [n for n in hit if evac.get(n) == "down"]
            result = await self.replicator.fix(ino, blob, down)
            p = self.progress
            if result.settled:
                p.done += 1
            else:
                p.failed += 1
                p.last_error = f"ino {ino}: {result.status}: {result.msg}"
            for node in hit:
                progress = p.nodes.get(node)
                if progress is None:
                    continue
                if result.settled and node not in result.replicas:
                    progress.remaining = max(0, progress.remaining - 1)
                elif not result.settled:
                    progress.failed += 1
        finally:
            limit.release()
