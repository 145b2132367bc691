"""The 2PC driver: runs `dfs.twopc.CommitProtocol` against real nodes and the real log.

It feeds the protocol events (BEGIN, COMMIT request, votes, acks, timeouts) and carries out
the actions it returns: PREPARE/COMMIT/ABORT RPCs to the replicas (concurrently, each with a
timeout), the forced decision write (the COMMITTED record and the inode switch in ONE
`db.write`, so concurrent decisions share an fsync), the reply, and the lazy ENDED write.
COMMIT delivery after the decision, redelivery until every replica acked (also after a
restart), and aborting expired transactions live in `delivery.py`. Repairs are transactions of
the same machine (`replicate.py` drives their events; `WriteRepairDecision` wakes the repair's
task to write its decision, `MarkBad` queues the repair of a replica that refused COMMIT).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import lmdb
import trio

from dfs import runtime
from dfs.chunks import shape_problem
from dfs.errors import Code, DfsError, InDoubt
from dfs.failpoints import failpoint
from dfs.meta import MetaStore, TxnRecord, TxnState
from dfs.meta.attrs import check_regular, moved_on
from dfs.metrics.coordinator import CLIENT_ABORT, CoordinatorMetrics, abort_reason
from dfs.rpc import Peers
from dfs.twopc import (
    Action,
    CommitProtocol,
    MarkBad,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendCommit,
    SendPrepare,
    WriteDecision,
    WriteEnd,
    WriteGroupDecision,
    WriteRepairDecision,
)

from .config import CoordinatorConfig
from .delivery import Delivery
from .group_commit import GroupCommit, OpenGroup
from .membership import Membership
from .outbox import Outbox
from .transactions import OpenTxn, TxidAllocator

log = logging.getLogger(__name__)


class CommitDriver(Delivery, GroupCommit):
    def __init__(self, store: MetaStore, membership: Membership, peers: Peers,
                 config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.membership = membership
        self.peers = peers
        self.config = config
        self.protocol = CommitProtocol()
        self.open: dict[int, OpenTxn] = {}
        self.groups: dict[int, OpenGroup] = {}  # multi-file commits, undecided (group_commit)
        self.recent_groups: OrderedDict[int, OpenGroup] = OrderedDict()  # by first member
        self.txids = TxidAllocator(store, config.txid_block)
        self._nursery: trio.Nursery | None = None
        self._delivering: set[int] = set()
        self._outboxes: dict[int, Outbox] = {}  # node -> its COMMIT/ABORT outbox
        # Repairs waiting for the machine's go to write their decision (WriteRepairDecision).
        self._repair_go: dict[int, trio.Event] = {}
        # Told of a replica that refused COMMIT (MarkBad): (node, blob, ino, reason). The
        # service points it at the read-repair queue.
        self.on_refused: Callable[[int, int, int, str], Awaitable[None]] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Recover owed COMMITs from the log, then run redelivery and expiry forever."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.recover()
            nursery.start_soon(self.redeliver_loop)
            nursery.start_soon(self.expiry_loop)
            task_status.started()

    def spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None, "CommitDriver.run is not running"
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------ client requests

    async def begin(self, ino: int, base_version: int | None, if_version: bool,
                    exclude: list[int]) -> dict[str, Any]:
        if if_version and base_version is None:
            raise DfsError(Code.BAD_REQUEST, "begin: if_version needs base_version")
        if ino:  # ino 0: a new file, which a multi-file decision creates (group_commit.py)
            self._check_writable(self.store.db.read(
                lambda txn: self.store.namespace.inodes.get(txn, ino)))
        nodes = self.membership.place(self.store.replicas, exclude)
        txid = await self.txids.allocate()
        ids = [n.id for n in nodes]
        self._apply_now(self.protocol.begin(txid, ids))
        self.open[txid] = OpenTxn(txid, ino, base_version, if_version, ids)
        return {"txid": txid, "replicas": [{"id": n.id, "address": n.address} for n in nodes],
                "keepalive_s": self.config.txn_timeout / 4}

    async def commit(self, txid: int, size: int, checksum: bytes, nchunks: int,
                     mtime_ns: int | None, voted: tuple[int, ...] = ()) -> dict[str, Any]:
        """Returns the new attr once the decision is durable; a retried COMMIT of the same
        txid gets the same answer (it waits for the first, or finds the record). `voted`:
        the replicas whose STAGE carried the prepare fields and voted YES (docs/design.md §5,
        rule 2); the machine sends PREPARE only to the others."""
        txn = self.open.get(txid)
        if txn is None:
            record = self.store.db.read(lambda t: self.store.txnlog.get(t, txid))
            if record is not None:
                ns = self.store.namespace
                return {"attr": self.store.db.read(lambda t: ns.getattr(t, record.ino))}
            raise DfsError(Code.UNAVAILABLE, f"transaction {txid} is unknown or was aborted")
        txn.touch()
        if not txn.committing:
            problem = shape_problem(size, checksum, nchunks)
            if problem:
                raise DfsError(Code.BAD_REQUEST, f"commit: {problem}")
            txn.size, txn.checksum, txn.nchunks, txn.mtime_ns = size, checksum, nchunks, mtime_ns
            txn.committing = True
            txn.commit_asked = trio.current_time()
            self.spawn(self._run_commit, txn, voted)
        return await txn.wait()

    async def abort(self, txid: int) -> None:
        txn = self.open.get(txid)
        if txn is None or txn.committing:
            return  # already settled, or too late: the commit's own outcome stands
        self.open.pop(txid, None)
        self.metrics.aborted(CLIENT_ABORT)
        txn.answer(DfsError(Code.UNAVAILABLE, f"transaction {txid} was aborted by the client"))
        await self._apply(self.protocol.abort(txid, "aborted by the client"))

    def touch(self, txid: int) -> None:
        """The client's keepalive while it stages a long write straight to the nodes."""
        txn = self.open.get(txid)
        if txn is None:
            raise DfsError(Code.UNAVAILABLE, f"transaction {txid} is unknown or was aborted")
        txn.touch()

    def outcome(self, txid: int, *, writer: bool = False, node: int = 0) -> str:
        """Rule 4, from what knows best first: the machine (a decision whose COMMITs are owed:
        committed; a write or a repair of this blob undecided: inflight), then the log's
        record, then the namespace (an inode whose current blob it is: committed, however long
        ago its record was purged), else presumed abort. Point reads only, no await: no
        decision can slip between the checks, and the record is durable (and the inode
        switched) before the machine forgets the txid is in flight. `writer`: the client that
        sent the commit asks (see below).

        `node`: the participant asking about its own PREPARED copy. A repair shares the blob's
        txid, so "the txid committed" does not say that copy did: a write or repair of the
        blob undecided is "inflight"; otherwise "committed" only while the namespace lists
        that copy now (a file's current blob, a retained version, a snapshot: what GC and
        `dfs check` count), else presumed aborted. Not the decision's record or the machine:
        they list the node for the decision's own copy, but a repair re-making a copy there
        (after the node refused COMMIT) may PREPARE it after the blob was superseded and GC
        deleted what the namespace listed, and then committed it where nothing names it: an
        orphan for ever (HA nemesis seeds 5, 23). Every decision switches the namespace in
        its own transaction, so a copy a decision made is listed from the moment it is
        decided until a later decision lets it go, and then aborting it is what GC would do."""
        if node:
            return self._outcome_for(txid, node)
        if self.protocol.is_committed(txid):
            return "committed"
        if self.protocol.is_in_flight(txid):
            return "inflight"
        store = self.store

        def known(txn: lmdb.Transaction) -> bool:
            return store.txnlog.get(txn, txid) is not None or \
                bool(store.namespace.inodes.holders(txn, txid))

        if store.db.read(known):
            return "committed"
        # A participant may presume abort: a record lives until every listed replica acked,
        # so one that still asks is not listed (or the txid never committed). The writer of
        # a commit whose reply was lost may ask after the retention: it is told "unknown"
        # rather than a wrong "aborted" it would report as a failure.
        if writer and store.db.read(lambda txn: store.txnlog.may_be_purged(txn, txid)):
            return "unknown"
        return "aborted"

    def _outcome_for(self, txid: int, node: int) -> str:
        """OUTCOME for participant `node`'s copy of txid (see `outcome`)."""
        if self.protocol.is_in_flight(txid):
            return "inflight"
        inodes = self.store.namespace.inodes
        listed = self.store.db.read(lambda t: inodes.lists(t, txid, node))
        return "committed" if listed else "aborted"

    # ------------------------------------------------------------ the commit

    async def _run_commit(self, txn: OpenTxn, voted: tuple[int, ...] = ()) -> None:
        try:
            # Fail fast, before any PREPARE, when the namespace already says no.
            inode = self.store.db.read(
                lambda t: self.store.namespace.inodes.find(t, txn.ino))
            if inode is None:
                raise DfsError(Code.ENOENT, f"file {txn.ino} was deleted during the write")
            self._check_writable(inode)
            if conflict := moved_on(f"file {txn.ino}", inode.version, txn.base_version,
                                    txn.if_version):
                raise conflict
            await failpoint("coordinator.before_prepare")
        except DfsError as e:
            self.open.pop(txn.txid, None)
            self.metrics.aborted(abort_reason(e))
            txn.answer(e)
            await self._apply(self.protocol.abort(txn.txid, e.msg))
            return
        await self._apply(
            self.protocol.request_commit(txn.txid, txn.size, txn.checksum, txn.nchunks, voted))

    async def _prepare_all(self, prepares: list[SendPrepare]) -> None:
        async with trio.open_nursery() as nursery:
            for action in prepares:
                nursery.start_soon(self._prepare_one, action, nursery.cancel_scope)

    async def _prepare_one(self, action: SendPrepare, scope: trio.CancelScope) -> None:
        address = self.membership.address(action.node)
        try:
            if address is None:
                raise DfsError(Code.UNAVAILABLE, f"node {action.node} is unknown")
            await self.peers[address].call(
                "prepare", timeout=self.config.vote_timeout, txid=action.txid, size=action.size,
                checksum=action.checksum, nchunks=action.nchunks)
        except DfsError as e:
            await self._apply(self.protocol.vote(action.txid, action.node, False, e.code, e.msg))
            if self.protocol.phase(action.txid) is None:
                scope.cancel()  # aborted: the other votes no longer matter
            return
        await self._apply(self.protocol.vote(action.txid, action.node, True))

    async def _decide(self, txid: int) -> None:
        txn = self.open[txid]
        try:
            await failpoint("coordinator.before_decision")
            now = runtime.wall_ns()
            record = TxnRecord(txid, TxnState.COMMITTED, txn.ino, txn.replicas, txn.size,
                               txn.checksum, txn.base_version, decided_ns=now)
            attr = await self.store.db.write(lambda t: self._write_decision(t, txn, record, now))
        except InDoubt as e:
            # Maybe written: neither an abort nor a failure may be said. The client gets no
            # reply and this leader steps down; the next one reads the truth (rule 4).
            txn.answer(e)
            return
        except DfsError as e:
            await self._apply(self.protocol.decision_refused(txid, e.code, e.msg))
            return
        except Exception as e:  # a bug in the decision write: it rolled back, so abort
            log.exception("decision write for txid %d failed", txid, extra={"txid": txid})
            await self._apply(self.protocol.decision_refused(txid, Code.INTERNAL, repr(e)))
            return
        # The commit point has passed (rule 1). From here the write is never undone.
        actions = self.protocol.decision_written(txid)
        self.open.pop(txid, None)
        self.metrics.committed(txn.size, trio.current_time() - txn.commit_asked)
        nodes = [a.node for a in actions if isinstance(a, SendCommit)]
        self._delivering.add(txid)
        try:
            await failpoint("coordinator.after_decision")
            txn.answer({"attr": attr})
        except DfsError as e:
            txn.answer(e)  # like a lost reply: the write is durable all the same
        self.spawn(self.deliver, txid, nodes, True)

    def _write_decision(self, t: lmdb.Transaction, txn: OpenTxn, record: TxnRecord,
                        now_ns: int) -> dict[str, Any]:
        attr = self.store.namespace.install_version(
            t, txn.ino, txn.txid, base_version=txn.base_version, if_version=txn.if_version,
            size=txn.size, checksum=txn.checksum, replicas=txn.replicas,
            mtime_ns=txn.mtime_ns, now_ns=now_ns)
        self.store.txnlog.record_commit(t, record)
        return attr

    # ------------------------------------------------------------ repairs

    def repair_go(self, blob: int) -> trio.Event:
        """The event a repair waits on before writing its decision (set by the machine's
        WriteRepairDecision, at once or once the blob's record has ended)."""
        return self._repair_go.setdefault(blob, trio.Event())

    def repair_done(self, blob: int) -> None:
        self._repair_go.pop(blob, None)

    async def mark_bad(self, txid: int, node: int, reason: str) -> None:
        """A replica refused COMMIT: queue its repair (durably). The record stays COMMITTED
        and owes the node's ack until a repair decision re-lists or drops it."""
        store = self.store

        def owner(t: lmdb.Transaction) -> int:
            record = store.txnlog.get(t, txid)
            holders = store.namespace.inodes.holders(t, txid)
            return holders[0].ino if holders else (record.ino if record else 0)

        ino = store.db.read(owner)
        log.warning("node %d %s of txid %d (ino %d); its copy is queued for repair", node,
                    reason, txid, ino, extra={"txid": txid})
        if self.on_refused is not None:
            await self.on_refused(node, txid, ino, reason)

    async def excuse_ack(self, txid: int, node: int) -> None:
        """If the namespace no longer lists `node` for blob txid (a later decision superseded
        the blob or dropped the copy), a COMMIT the node refused is owed no more."""
        if node not in self.protocol.refused(txid):
            return
        inodes = self.store.namespace.inodes
        if not self.store.db.read(lambda t: inodes.lists(t, txid, node)):
            await self._apply(self.protocol.excuse_ack(txid, node))

    # ------------------------------------------------------------ actions

    def _apply_now(self, actions: list[Action]) -> None:
        if actions:
            raise AssertionError(f"unexpected actions {actions}")

    async def _apply(self, actions: list[Action]) -> None:
        """Carry out the protocol's actions in order; sends that nobody waits for are spawned."""
        prepares: list[SendPrepare] = []
        commits: dict[int, list[int]] = {}
        for action in actions:
            if isinstance(action, SendPrepare):
                prepares.append(action)
            elif isinstance(action, SendCommit):
                commits.setdefault(action.txid, []).append(action.node)
            elif isinstance(action, SendAbort):
                self.spawn(self.send_abort, action.node, action.txid)
            elif isinstance(action, WriteDecision):
                await self._decide(action.txid)
            elif isinstance(action, WriteGroupDecision):
                await self._decide_group(action.group, action.members)
            elif isinstance(action, WriteEnd):
                await self.write_end(action.txid)
            elif isinstance(action, WriteRepairDecision):
                go = self._repair_go.get(action.blob)
                if go is not None:
                    go.set()  # the repair's own task writes it (it knows the new list)
            elif isinstance(action, MarkBad):
                self.spawn(self.mark_bad, action.txid, action.node, action.reason)
            elif isinstance(action, ReplyError) and action.txid in self.groups:
                group = self.groups.pop(action.txid)
                error = DfsError(action.code, action.msg, failed=list(action.failed))
                for op in group.writes:
                    member = self.open.pop(op["txid"], None)
                    if member is not None:
                        self.metrics.aborted(abort_reason(error))
                        member.answer(error)
                group.answer(error)
            elif isinstance(action, ReplyError):
                txn = self.open.pop(action.txid, None)
                if txn is not None:
                    self.metrics.aborted(action.code.value.lower())
                    # `failed` lets the client retry with those replicas excluded.
                    txn.answer(DfsError(action.code, action.msg, failed=list(action.failed)))
            elif isinstance(action, ReplyOk):
                raise AssertionError("ReplyOk is handled by _decide")
        for txid, nodes in commits.items():
            if txid not in self._delivering:
                self.spawn(self.deliver, txid, nodes, False)
        if prepares:
            await self._prepare_all(prepares)

    _check_writable = staticmethod(check_regular)

    # ------------------------------------------------------------ reporting

    def committing_count(self) -> int:
        return sum(1 for _, phase, _, _ in self.protocol.transactions()
                   if phase in (Phase.COMMITTING, Phase.ENDING))

    def txn_list(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        out: list[dict[str, Any]] = []
        for txn in sorted(self.open.values(), key=lambda t: t.txid):
            phase = self.protocol.phase(txn.txid)
            out.append({"txid": txn.txid, "ino": txn.ino,
                        "state": phase.value if phase else "aborted",
                        "replicas": txn.replicas, "acked": [],
                        "age_s": round(now - txn.begun, 3)})
        # Committed, not ended: the protocol knows them all (recovery loaded the log's), so
        # this costs point reads, not a scan of the ENDED records kept for retention.
        now_ns = runtime.wall_ns()
        txnlog = self.store.txnlog
        for txid, phase, replicas, acked in sorted(self.protocol.transactions()):
            if phase not in (Phase.COMMITTING, Phase.ENDING):
                continue
            record = self.store.db.read(lambda t, txid=txid: txnlog.get(t, txid))
            out.append({"txid": txid, "ino": record.ino if record else None,
                        "state": "committed", "replicas": list(replicas),
                        "acked": [n for n in replicas if n in acked],
                        "age_s": round((now_ns - record.decided_ns) / 1e9, 3) if record else 0})
        return out
