"""The repair transaction: give one file R good replicas again (docs/checker.md).

A repair is a write that keeps the content: the file's blob id and version stay, only where
its copies live changes. Like a write it goes STAGE -> PREPARE -> decision -> COMMIT:

1. plan (copyplan.py): which replicas stay, which bad copies are re-made in place, which
   evacuated ones (removed, draining, down too long) are replaced by new nodes;
2. STAGE: each target `fetch`es the blob from a good replica, node to node (the target keeps
   a local copy that verifies; a bad one it drops first). An in-place copy is only started
   after a source has been deep-verified, so a file with no good copy is never touched;
3. PREPARE: the target verifies every chunk and the whole checksum and forces PREPARED;
4. decision, one forced LMDB transaction: the inode still has this blob (else the file moved
   on and the copies are aborted), its replica list switches, dropped copies go to the GC
   queue, and the blob's txn record says COMMITTED for the targets (a coordinator restart
   re-sends the COMMIT, rule 3);
5. COMMIT to the targets by the ordinary delivery machinery.

The repair is a transaction of the driver's 2PC machine (`dfs.twopc`, keyed by the blob id):
from `begin_repair` until the decision OUTCOME answers "inflight" for the blob, afterwards
"committed" (the machine holds the merged COMMITTING entry until every target acked), so a
target that asks before its COMMIT arrives keeps its copy however long ago the file's own
record was purged. Nothing here writes a decision the machine did not ask for.

A crash before 4 leaves the old list: a target's PREPARED copy is dropped (its OUTCOME names
the node, and no decision lists it: presumed abort), a target that already held a committed
copy keeps an orphan the checker collects; after 4 the new list stands and COMMIT is re-sent.
Never worse than before.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import trio

from dfs import runtime
from dfs.chunks import nchunks
from dfs.errors import Code, DfsError, InDoubt
from dfs.failpoints import failpoint
from dfs.locks import KeyedLocks
from dfs.meta import MetaStore, TxnRecord, TxnState
from dfs.rpc import Peers

from .config import CoordinatorConfig
from .copyplan import CopyPlan, new_replica_list, plan_copy, verdict_without_source
from .membership import Membership

if TYPE_CHECKING:
    from .commit import CommitDriver

log = logging.getLogger(__name__)

COPY_CONCURRENCY = 64  # repairs running at once in this coordinator
COPY_TIMEOUTS = 3  # a fetch or verify waits this many rpc_timeouts (plus size / COPY_MIN_RATE)
COPY_MIN_RATE = 20e6
END_WAIT = 5.0  # wait this long at most for the blob's own txn record to finish ending
RETRY_FOR = 3.0  # idempotent node calls are retried on network errors this long


@dataclass
class FixResult:
    """fixed | ok (nothing to do) | moved_on (the file changed) | lost | unavailable |
    partial (better, not yet R good copies) | failed."""

    ino: int
    status: str
    msg: str = ""
    replicas: list[int] = field(default_factory=list)
    suspects: list[int] = field(default_factory=list)  # sources whose copy proved bad

    @property
    def settled(self) -> bool:
        return self.status in ("fixed", "ok", "moved_on")

    def to_wire(self) -> dict[str, Any]:
        return {"ino": self.ino, "status": self.status, "msg": self.msg,
                "replicas": self.replicas, "suspects": self.suspects}


class Replicator:
    def __init__(self, store: MetaStore, membership: Membership, peers: Peers,
                 driver: CommitDriver, config: CoordinatorConfig) -> None:
        self.store = store
        self.membership = membership
        self.peers = peers
        self.driver = driver
        self.config = config
        self.active: set[int] = set()  # blobs being copied: in flight for the checker
        self.copied = 0
        self.copied_bytes = 0
        self._limit = trio.CapacityLimiter(COPY_CONCURRENCY)
        # Told about copies that proved bad while repairing another (queued for their own repair).
        self.on_suspects: Callable[[int, int, list[int]], Awaitable[None]] | None = None
        self.file_locks = KeyedLocks()  # one repair per file at a time; the GC takes them too

    def node_view(self) -> tuple[dict[int, str], set[int]]:
        nodes = self.membership.nodes
        return ({n: str(r.state) for n, r in nodes.items()},
                {n for n in nodes if self.membership.is_live(n)})

    async def fix(self, ino: int, blob: int | None, bad: Collection[int] = (), *,
                  evacuate_down: bool = False) -> FixResult:
        """Repair one file (one transaction); `blob` None: whatever it holds now."""
        async with self.file_locks.hold(ino), self._limit:
            try:
                result = await self._fix(ino, blob, set(bad), evacuate_down)
            except DfsError as e:
                result = FixResult(ino, "failed", e.msg)
            except Exception as e:  # a bug must cost this repair, not the coordinator
                log.exception("repair of ino %d failed", ino)
                result = FixResult(ino, "failed", f"internal error: {e!r}")
        suspects = [n for n in result.suspects if n not in bad]
        if suspects and blob is not None and self.on_suspects is not None \
                and result.status != "lost":
            await self.on_suspects(ino, blob, suspects)
        return result

    async def _fix(self, ino: int, blob: int | None, bad: set[int], evacuate_down: bool
                   ) -> FixResult:
        # The file's current content, or a retained version of it (docs/coordinator.md,
        # "Version history"): both are repaired the same way.
        inode = self.store.db.read(lambda t: self.store.namespace.inodes.holder(t, ino, blob))
        if inode is None:
            return FixResult(ino, "moved_on", "the file changed or is gone")
        states, live = self.node_view()
        plan = plan_copy(inode.replicas, self.store.replicas, states, live, bad,
                         evacuate_down=evacuate_down)
        if plan.nothing_to_do:
            return FixResult(ino, "ok", replicas=plan.replicas)
        if not plan.sources:
            return FixResult(ino, verdict_without_source(plan, live),
                             "no live replica to copy from", plan.replicas)
        sources, suspects = plan.sources, []
        if plan.in_place:  # a bad copy is dropped before its re-copy: first make sure of a source
            good, suspects = await self._verified_source(inode, plan.sources)
            if good is None:
                status = "lost" if len(suspects) == len(plan.sources) and \
                    verdict_without_source(plan, live) == "lost" else "unavailable"
                return FixResult(ino, status, "no replica verifies", plan.replicas, suspects)
            sources = [good, *(s for s in plan.sources if s != good)]
        new_nodes = self._place(plan.new, plan.replicas)
        targets = plan.in_place + new_nodes
        if not targets:
            return FixResult(ino, "unavailable", "no live node outside the replicas to copy to",
                             plan.replicas)
        self.active.add(inode.blob)
        try:
            return await self._copy_and_decide(inode, plan, targets, new_nodes, sources,
                                               suspects)
        finally:
            self.active.discard(inode.blob)

    async def _copy_and_decide(self, inode: Any, plan: CopyPlan, targets: list[int],
                               new_nodes: list[int], sources: list[int], suspects: list[int]
                               ) -> FixResult:
        """The repair as a transaction of the driver's 2PC machine: begin_repair, the copies
        (fetch + PREPARE, done here), repair_prepared, the decision write when the machine
        says go, repair_decision_written; the machine sends ABORTs and COMMITs."""
        blob, driver = inode.blob, self.driver
        protocol = driver.protocol
        if protocol.is_in_flight(blob):
            return FixResult(inode.ino, "unavailable", "the file's write is still being decided",
                             plan.replicas)
        protocol.begin_repair(blob, targets, new_nodes)
        results: dict[int, str] = {}
        bad_sources: set[int] = set(suspects)
        go = driver.repair_go(blob)
        try:
            try:
                async with trio.open_nursery() as nursery:
                    for node in targets:
                        nursery.start_soon(self._copy_to, node, inode, sources, results,
                                           bad_sources)
                await failpoint("repair.before_decision")
                ok = [t for t in targets if results.get(t) in ("staged", "have")]
                errors = "; ".join(f"node {t}: {results[t]}" for t in targets if t not in ok)
                await driver._apply(protocol.repair_prepared(
                    blob, [t for t in ok if results[t] == "staged"],
                    [t for t in ok if results[t] == "have"]))
                if not ok:
                    return FixResult(inode.ino, "failed", errors, plan.replicas,
                                     sorted(bad_sources))
                with trio.move_on_after(END_WAIT):
                    await go.wait()  # at once, unless the blob's record is being ended
                if not go.is_set():
                    await driver._apply(protocol.repair_abandoned(blob))
                    return FixResult(inode.ino, "unavailable",
                                     "the blob's record is still ending", plan.replicas)
            except BaseException:
                # Cancelled or failed before the decision write: the machine must not keep
                # the blob in flight (nor hold its record's end) for a repair that is gone.
                with trio.CancelScope(shield=True):
                    await driver._apply(protocol.repair_decision_refused(blob) if go.is_set()
                                        else protocol.repair_abandoned(blob))
                raise
            replicas = new_replica_list(plan, self.store.replicas, [t for t in new_nodes if t in ok])
            try:
                with trio.CancelScope(shield=True):  # the machine must hear how it went
                    await self._decide(inode, plan, replicas, ok)
            except InDoubt:
                raise  # maybe written: no abort to its targets; this leader steps down
            except BaseException as e:
                with trio.CancelScope(shield=True):  # it may end the blob's record (WriteEnd)
                    await driver._apply(protocol.repair_decision_refused(blob))
                if isinstance(e, DfsError) and e.code is Code.CONFLICT:
                    return FixResult(inode.ino, "moved_on", e.msg)
                raise
            commits = protocol.repair_decision_written(blob, replicas)
        finally:
            driver.repair_done(blob)
        await failpoint("repair.after_decision")  # an error here: redelivery sends them
        await driver._apply(commits)
        self.copied += sum(1 for t in ok if results[t] == "staged")
        self.copied_bytes += inode.size * sum(1 for t in ok if results[t] == "staged")
        complete = (set(plan.in_place) <= set(ok) and len(replicas) >= self.store.replicas
                    and not set(plan.evacuate) & set(replicas))
        # Per file at DEBUG when all went well: a re-replication round logs its own summary.
        log.log(logging.INFO if errors else logging.DEBUG,
                "repair of ino %d (blob %d): replicas %s -> %s%s", inode.ino, inode.blob,
                plan.replicas, replicas, f" ({errors})" if errors else "")
        return FixResult(inode.ino, "fixed" if complete else "partial", errors, replicas,
                         sorted(bad_sources))

    async def _copy_to(self, node: int, inode: Any, sources: list[int], results: dict[int, str],
                       bad_sources: set[int]) -> None:
        """STAGE (fetch) and PREPARE the blob on one target; results[node] says how it went."""
        address = self.membership.address(node)
        by_address = {self.membership.address(s): s for s in sources if s != node}
        timeout = self._copy_timeout(inode.size)
        fields = dict(size=inode.size, checksum=inode.checksum, nchunks=nchunks(inode.size))
        try:
            if address is None:
                raise DfsError(Code.UNAVAILABLE, "unknown node")
            # retry_for: a pooled connection may be stale (the node restarted); both ops are
            # idempotent (fetch keeps a copy that verifies, prepare re-votes the same content).
            # within_ms: the node gives up by this deadline, each source a share of it (a
            # hung source costs one share, not the node's 30 s peer timeout).
            reply = await self.peers[address].call(
                "fetch", timeout=timeout, retry_for=RETRY_FOR, blob=inode.blob,
                sources=list(by_address), within_ms=int(timeout * 1000), **fields)
            if reply.get("have"):
                results[node] = "have"
                return
            await failpoint("repair.after_fetch")
            # The target's vote, bounded like a write's (plus its re-hash of the blob): a lost
            # reply must not hold the file's repair lock, and its copy, for a fetch's timeout.
            await self.peers[address].call(
                "prepare", timeout=self.config.vote_timeout + inode.size / COPY_MIN_RATE,
                retry_for=RETRY_FOR, txid=inode.blob, **fields)
            results[node] = "staged"
        except DfsError as e:
            results[node] = e.msg
            for a in e.details.get("bad_sources") or ():
                if by_address.get(a) is not None:
                    bad_sources.add(by_address[a])

    async def _verified_source(self, inode: Any, sources: list[int]
                               ) -> tuple[int | None, list[int]]:
        """The first source whose copy re-hashes right, and those found bad on the way."""
        bad: list[int] = []
        for node in sources:
            address = self.membership.address(node)
            if address is None:
                continue
            try:
                reply = await self.peers[address].call(
                    "verify", timeout=self._copy_timeout(inode.size),
                    retry_for=RETRY_FOR, blobs=[inode.blob])
            except DfsError as e:
                log.info("repair of ino %d: cannot verify node %d's copy: %s", inode.ino, node, e)
                continue
            results = reply.get("results") or {}
            verdict = results.get(inode.blob) or {}
            if (verdict.get("ok") and verdict.get("size") == inode.size
                    and verdict.get("checksum") == inode.checksum):
                return node, bad
            bad.append(node)
        return None, bad

    def _copy_timeout(self, size: int) -> float:
        """How long a node may take to fetch or re-hash a blob of `size` bytes: 30 s at the
        default --rpc-timeout, shorter where the operator (or a test) shortens that."""
        return COPY_TIMEOUTS * self.config.rpc_timeout + size / COPY_MIN_RATE

    def _place(self, count: int, exclude: list[int]) -> list[int]:
        """Up to `count` new live up nodes outside `exclude` (fewer if the cluster has fewer)."""
        for k in range(count, 0, -1):
            try:
                return [n.id for n in self.membership.place(k, exclude)]
            except DfsError:
                continue
        return []

    async def _decide(self, inode: Any, plan: CopyPlan, replicas: list[int], targets: list[int]
                      ) -> TxnRecord:
        """The commit point of the repair (WriteRepairDecision): the replica switch and the
        COMMITTED record for the targets, forced in one LMDB transaction. The record merges
        with the blob's own if it is still COMMITTED (targets owe a new ack, dropped replicas
        none), as the machine merges their entries."""
        blob, ino = inode.blob, inode.ino
        store = self.store
        now = runtime.wall_ns()
        grace = store.namespace.inodes.gc_grace_ns

        def write(txn: lmdb.Transaction) -> TxnRecord:
            inodes = store.namespace.inodes
            current = inodes.holder(txn, ino, blob)
            if current is None or list(dict.fromkeys(current.replicas)) != plan.replicas:
                raise DfsError(Code.CONFLICT, f"file {ino} changed during its repair")
            dropped = [n for n in plan.replicas if n not in replicas]
            for node in dropped:
                store.gc.add(txn, now + grace, node, blob, ino)
            inodes.set_replicas(txn, ino, blob, replicas)
            record = store.txnlog.get(txn, blob)
            if record is not None and record.state is TxnState.COMMITTED:
                record.replicas += [t for t in targets if t not in record.replicas]
                record.acked = [n for n in record.replicas
                                if (n in record.acked or n in dropped) and n not in targets]
            else:
                record = TxnRecord(blob, TxnState.COMMITTED, ino, list(targets), current.size,
                                   current.checksum or b"", None, decided_ns=now)
            store.txnlog.record_commit(txn, record)
            return record

        return await store.db.write(write)
