"""The storage node's request handlers (docs/protocol.md, "Storage node ops").

NodeService drives the sans-IO Participant: every control op reads the blob's stored state,
asks the participant what to do, and carries the action out against the BlobStore, passing
the stored states the action allows (the store re-checks them inside its write). PREPARE,
COMMIT, ABORT and the participant's own drops/outcome resolutions for one txid are
serialized by a per-txid lock; STAGE is not (a client streams a blob's chunks in parallel) and
is kept safe by that re-check (a staged chunk never changes; staging stops at PREPARED).
It also carries the coordinator link's news to the participant: the coordinator's
incarnation and the STAGED txids it does not know (`coordinator_seen`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from dfs import runtime
from dfs.chunks import CHUNK_SIZE, shape_problem
from dfs.errors import Code, DfsError
from dfs.failpoints import failpoint
from dfs.locks import KeyedLocks
from dfs.rpc import Request, Service
from storage_node.compaction import Compactor
from storage_node.layout import MAX_BLOB_ID, MAX_INDEX, BlobState
from storage_node.maintenance import MaintenanceOps
from storage_node.participant import (
    OUTCOMES,
    SERVABLE,
    AskOutcome,
    Drop,
    ForceCommitted,
    ForcePrepared,
    Participant,
    Refuse,
    Shape,
    StageAndPrepare,
)
from storage_node.store import BlobStore

log = logging.getLogger(__name__)

MAX_IDS_PER_REQUEST = 10_000
MAX_LIST = 10_000
#: At most this many txids in one batched COMMIT or ABORT (the coordinator sends up to
#: dfs.coordinator.outbox.MAX_COMMIT_BATCH).
MAX_TXIDS_PER_COMMIT = 1024

OutcomeAsker = Callable[[int], Awaitable[str]]


def _blob_id(req: Request, key: str) -> int:
    value = req.int(key)
    if value > MAX_BLOB_ID:
        raise DfsError(Code.BAD_REQUEST, f"{req.op}: field {key!r} exceeds 64 bits")
    return value


def _blob_ids(req: Request, key: str, limit: int = MAX_IDS_PER_REQUEST) -> list[int]:
    values = req.list(key)
    if len(values) > limit:
        raise DfsError(Code.BAD_REQUEST, f"{req.op}: more than {limit} ids")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_BLOB_ID:
            raise DfsError(Code.BAD_REQUEST, f"{req.op}: {key!r} must hold blob ids")
    return values


def _txids(req: Request, limit: int) -> tuple[bool, list[int]]:
    """COMMIT/ABORT's ids: (True, [txid]) for the single form, (False, the distinct txids in
    order) for a batch; BAD_REQUEST for neither, both, or a bad list (nothing is changed)."""
    if ("txid" in req.msg) == ("txids" in req.msg):
        raise DfsError(Code.BAD_REQUEST, f"{req.op}: give either 'txid' or 'txids'")
    if "txid" in req.msg:
        return True, [_blob_id(req, "txid")]
    return False, list(dict.fromkeys(_blob_ids(req, "txids", limit)))


@asynccontextmanager
async def _hold_all(locks: KeyedLocks, keys: list[int]) -> AsyncIterator[None]:
    """Hold the locks of every key, taken in sorted order so that two batches sharing txids
    cannot deadlock (every other holder takes one txid's lock at a time)."""
    async with AsyncExitStack() as stack:
        for key in sorted(keys):
            await stack.enter_async_context(locks.hold(key))
        yield


def _batch_reply(acked: list[int], refused: dict[int, DfsError]) -> dict[str, Any]:
    return {"acked": acked,
            "refused": [[txid, e.code.value, e.msg] for txid, e in refused.items()]}


class NodeService(MaintenanceOps, Service):
    """Op `x` -> `op_x`. `clock` is wall-clock seconds (blob `created` stamps are unix time)."""

    def __init__(
        self,
        store: BlobStore,
        participant: Participant,
        *,
        clock: Callable[[], float] = runtime.wall,
        heartbeat: float = 0.5,
    ) -> None:
        self.store = store
        self.participant = participant
        self.clock = clock
        self.heartbeat = heartbeat  # seconds between beats: part of the cleanup horizon
        self._txn_locks = KeyedLocks()
        self.compactor = Compactor(store)  # the node puts its own (with its nursery) here
        # Served COMMIT requests and the txids they carried (node_info: batching at work).
        self.commit_requests = 0
        self.commit_txids = 0
        self.metrics_address: str | None = None  # where --metrics serves (node_info)

    def _stored(self, txid: int) -> str | None:
        return self._held(txid)[0]

    def _held(self, txid: int) -> tuple[str | None, Shape | None]:
        """The blob's stored state and, once prepared, the content it holds."""
        info = self.store.stat(txid)
        return (info.state.value, info.shape) if info else (None, None)

    # ------------------------------------------------------------ 2PC ops

    async def op_stage(self, req: Request) -> dict[str, Any]:
        txid = _blob_id(req, "txid")
        index = req.int("index")
        data = req.bytes("data")
        if index > MAX_INDEX:
            raise DfsError(Code.BAD_REQUEST, "stage: index exceeds 32 bits")
        if len(data) > CHUNK_SIZE:
            raise DfsError(Code.BAD_REQUEST, f"stage: chunk larger than {CHUNK_SIZE} bytes")
        if "checksum" in req.msg:
            return await self._stage_prepare(req, txid, index, data)
        action = self.participant.on_stage(txid, self._stored(txid), self.clock())
        if isinstance(action, Refuse):
            raise action.error()
        await self.store.stage(txid, index, data, allowed=action.allowed)
        if (drop := self.participant.on_staged(txid)) is not None:
            await self.drop(drop)
            raise DfsError(Code.CONFLICT, f"transaction {txid} was aborted")
        await failpoint("node.after_stage")
        return {}

    async def _stage_prepare(self, req: Request, txid: int, index: int,
                             data: bytes) -> dict[str, Any]:
        """A STAGE of the blob's last chunk carrying the prepare fields (docs/design.md §5,
        rule 2): the chunk is stored and PREPARED forced in one durable write, and the reply
        is the vote: {} = YES only after that force; an error = NO, as for PREPARE. Under the
        txid's lock, as PREPARE is. Both failpoints fire after the force, before the reply."""
        size, checksum, nchunks = self._prepare_fields(req)
        async with self._txn_locks.hold(txid):
            stored, held = self._held(txid)
            action = self.participant.on_stage_prepare(
                txid, stored, nchunks, self.clock(), held=held, wanted=(size, checksum, nchunks))
            if isinstance(action, Refuse):
                log.info("stage+prepare %d: vote NO (%s)", txid, action.msg,
                         extra={"txid": txid})
                raise action.error()
            if isinstance(action, StageAndPrepare):
                await self._vote(txid, self.store.stage_prepared(
                    txid, index, data, size, checksum, nchunks, allowed=action.allowed))
            elif isinstance(action, ForcePrepared):
                await self._vote(txid, self.store.prepare(txid, size, checksum, nchunks))
            # else: already prepared with this content, a YES again with nothing to force
        await failpoint("node.after_stage")
        await failpoint("node.before_vote")
        return {}

    async def op_prepare(self, req: Request) -> dict[str, Any]:
        txid = _blob_id(req, "txid")
        size, checksum, nchunks = self._prepare_fields(req)
        async with self._txn_locks.hold(txid):
            stored, held = self._held(txid)
            action = self.participant.on_prepare(txid, stored, nchunks, held=held,
                                                 wanted=(size, checksum, nchunks))
            if isinstance(action, Refuse):
                log.info("prepare %d: vote NO (%s)", txid, action.msg, extra={"txid": txid})
                raise action.error()
            if isinstance(action, ForcePrepared):
                await self._vote(txid, self.store.prepare(txid, size, checksum, nchunks))
        await failpoint("node.before_vote")
        return {}

    @staticmethod
    def _prepare_fields(req: Request) -> tuple[int, bytes, int]:
        size, checksum, nchunks = req.int("size"), req.bytes("checksum"), req.int("nchunks")
        if problem := shape_problem(size, checksum, nchunks):
            raise DfsError(Code.BAD_REQUEST, f"{req.op}: {problem}")
        return size, checksum, nchunks

    async def _vote(self, txid: int, force: Awaitable[Any]) -> None:
        """Run the store's verify-and-force, then tell the participant (YES: its OUTCOME timer
        starts) or, on any failure, that the prepare failed (the NO is the error)."""
        try:
            await force
        except BaseException as e:
            self.participant.on_prepare_failed(txid, self.clock())
            if isinstance(e, DfsError):
                log.info("prepare %d: vote NO (%s)", txid, e, extra={"txid": txid})
            raise
        self.participant.on_prepared(txid, self.clock())

    async def op_commit(self, req: Request) -> dict[str, Any]:
        """COMMIT of one `txid` (an ack is {}, a refusal an error reply, as ever) or of a
        batch, `txids` (docs/design.md §5 rule 5): every txid under its own lock and through
        the participant's rules, and all their COMMITTED records forced in ONE write. The
        reply names each txid: `acked`, or `refused` with the code and message the single op
        would have answered."""
        single, txids = _txids(req, MAX_TXIDS_PER_COMMIT)
        self.commit_requests += 1
        self.commit_txids += len(txids)
        async with _hold_all(self._txn_locks, txids):
            acked, refused = await self._commit_held(txids)
        if single and refused:
            raise refused[txids[0]]
        await failpoint("node.before_commit_ack")
        return {} if single else _batch_reply(acked, refused)

    async def _commit_held(self, txids: list[int]) -> tuple[list[int], dict[int, DfsError]]:
        """The locks of `txids` held: ask the participant about each, force what it says to
        force in one durable write, and report each result back to it."""
        acked: list[int] = []
        refused: dict[int, DfsError] = {}
        force: dict[int, frozenset[str | None]] = {}
        for txid in txids:
            action = self.participant.on_commit(txid, self._stored(txid))
            if isinstance(action, Refuse):
                refused[txid] = action.error()
            elif isinstance(action, ForceCommitted):
                force[txid] = action.allowed
            else:
                acked.append(txid)
        if force:
            try:
                results: dict[int, Any] = await self.store.commit_many(force)
            except DfsError as e:  # the write failed (a full disk): nothing was committed
                results = dict.fromkeys(force, e)
            for txid, result in results.items():
                if isinstance(result, DfsError):
                    refused[txid] = result
                else:
                    self.participant.on_committed(txid)
                    acked.append(txid)
        return acked, refused

    async def op_abort(self, req: Request) -> dict[str, Any]:
        """ABORT of one `txid` or of a batch, `txids` (dropped in one unforced write); the
        reply to a batch names each txid as COMMIT's does."""
        single, txids = _txids(req, MAX_TXIDS_PER_COMMIT)
        async with _hold_all(self._txn_locks, txids):
            acked, refused = await self._abort_held(txids)
        if single and refused:
            raise refused[txids[0]]
        return {} if single else _batch_reply(acked, refused)

    async def _abort_held(self, txids: list[int]) -> tuple[list[int], dict[int, DfsError]]:
        acked: list[int] = []
        refused: dict[int, DfsError] = {}
        drops: dict[int, Drop] = {}
        for txid in txids:
            action = self.participant.on_abort(txid, self._stored(txid))
            if isinstance(action, Refuse):
                refused[txid] = action.error()
            else:
                drops[txid] = action
        if drops:
            try:
                results: dict[int, Any] = await self.store.abort_many(
                    {txid: d.allowed for txid, d in drops.items()})
            except DfsError as e:
                results = dict.fromkeys(drops, e)
            for txid, result in results.items():
                self._dropped(drops[txid], result if isinstance(result, DfsError) else None)
                if isinstance(result, DfsError):
                    refused[txid] = result
                else:
                    acked.append(txid)
        return acked, refused

    # ------------------------------------------------------------ data and admin ops

    async def op_read(self, req: Request) -> dict[str, Any]:
        blob = _blob_id(req, "blob")
        index = req.int("index")
        if index > MAX_INDEX:
            raise DfsError(Code.BAD_REQUEST, "read: index exceeds 32 bits")
        data, digest = self.store.read_chunk(blob, index, allowed=SERVABLE)
        return {"data": data, "digest": digest}

    async def op_stat(self, req: Request) -> dict[str, Any]:
        """Each blob's record; a STAGED/PREPARED one also says how long it has been idle here
        and the participant's cleanup horizon for it (docs/checker.md, cleanup in progress)."""
        out: dict[int, Any] = {}
        now = self.clock()
        for blob in _blob_ids(req, "blobs"):
            info = self.store.stat(blob)
            out[blob] = info.to_wire() if info else None
            if info is not None and info.state != BlobState.COMMITTED:
                idle = self.participant.idle(blob, now)
                out[blob]["idle_s"] = max(0.0, now - info.created) if idle is None else idle
                out[blob]["horizon_s"] = self.participant.cleanup_horizon(
                    info.state.value, self.heartbeat)
        return {"blobs": out}

    async def op_list(self, req: Request) -> dict[str, Any]:
        after = min(req.int("after", 0), MAX_BLOB_ID)
        limit = min(req.int("limit", 1000), MAX_LIST)
        infos = self.store.list(after, limit)
        return {"blobs": [[i.blob, i.state.value, i.size, i.checksum] for i in infos]}

    async def op_delete(self, req: Request) -> dict[str, Any]:
        blobs = _blob_ids(req, "blobs")
        deleted = await self.store.delete(blobs)
        for blob in blobs:
            self.participant.on_deleted(blob)
        return {"deleted": deleted}

    async def op_node_info(self, req: Request) -> dict[str, Any]:
        return {
            "node_id": self.store.node_id,
            "cluster": self.store.cluster,
            "capacity": self.store.capacity(),
            "used": self.store.used(),
            "blobs": self.store.count(),
            "commit_requests": self.commit_requests,
            "commit_txids": self.commit_txids,
            **self.compactor.space(),
            "compaction": None if (job := self.compactor.current) is None else job.to_wire(),
            "metrics": self.metrics_address,
        }

    async def op_compact(self, req: Request) -> dict[str, Any]:
        """Start an online compaction (or join the running one); `wait`: reply once it is
        done. The reply is its progress (node_info's `compaction` shows it too)."""
        job = self.compactor.start()
        if req.bool("wait"):
            await job.finished.wait()
        return job.to_wire()

    # ------------------------------------------------------------ recovery and timeouts

    async def restore(self) -> int:
        """Feed the participant every STAGED/PREPARED blob in the store (at start-up)."""
        pending = await runtime.in_thread(self.store.pending)
        now = self.clock()
        for info in pending:
            self.participant.restore(info.blob, info.state.value, info.created, now)
        prepared = sum(1 for i in pending if i.state == BlobState.PREPARED)
        if pending:
            log.info("recovery: %d prepared, %d staged blobs", prepared, len(pending) - prepared)
        return len(pending)

    async def drop(self, action: Drop) -> None:
        """Carry out a participant's Drop (only while the blob is in a state it allows)."""
        try:
            async with self._txn_locks.hold(action.txid):
                await self._drop_held(action)
        except DfsError as e:
            log.warning("dropping blob %d: %s", action.txid, e, extra={"txid": action.txid})

    async def _drop_held(self, action: Drop) -> None:
        """Carry out a Drop, the txid's lock held (see `_dropped`)."""
        try:
            await self.store.abort(action.txid, allowed=action.allowed)
        except DfsError as e:
            self._dropped(action, e)
            raise
        self._dropped(action, None)

    def _dropped(self, action: Drop, error: DfsError | None) -> None:
        """Report a Drop's result to the participant. One the store failed (a full disk) is
        handed back to it to try again: it already counts the txid as aborted and would never
        come back to it. CONFLICT means the blob is no longer in a state the drop may take:
        nothing is owed."""
        if error is None or error.code == Code.CONFLICT:
            self.participant.on_dropped(action.txid)
        else:
            self.participant.on_drop_failed(action, self.clock())

    # ------------------------------------------------------------ the coordinator's view

    def leftovers_to_name(self) -> list[int]:
        """STAGED txids to name in the next heartbeat (see Participant.leftovers_to_name)."""
        return self.participant.leftovers_to_name(self.clock())

    async def coordinator_seen(self, incarnation: Any, unknown: Any) -> bool:
        """A register/heartbeat reply: the coordinator's incarnation, and which of the txids
        named it does not know (presumed aborted: dropped now). True if it restarted."""
        changed = False
        if isinstance(incarnation, int) and not isinstance(incarnation, bool):
            changed = self.participant.on_incarnation(incarnation, self.clock())
            if changed:
                log.info("coordinator incarnation %d: asking about leftovers", incarnation)
        txids = unknown if isinstance(unknown, list) else []
        for txid in txids[:MAX_IDS_PER_REQUEST]:
            if not isinstance(txid, int) or isinstance(txid, bool):
                continue
            if self._txn_locks.busy(txid):
                # Being worked on (a fetch pulling chunks, a PREPARE): not an idle leftover,
                # and the heartbeat loop must never wait for it. Named again next time.
                continue
            async with self._txn_locks.hold(txid):
                action = self.participant.on_presumed_aborted(txid)
                if action is None:
                    continue
                try:
                    await self._drop_held(action)
                except DfsError as e:
                    log.warning("dropping blob %d: %s", txid, e, extra={"txid": txid})
                else:
                    log.info("blob %d staged for a transaction the coordinator does not "
                             "know: presumed aborted, dropped", txid, extra={"txid": txid})
        return changed

    async def resolve(self, txid: int, outcome: str) -> None:
        """The coordinator told us txid's outcome; commit or drop as the participant says."""
        async with self._txn_locks.hold(txid):
            action = self.participant.on_outcome(txid, outcome, self.clock(),
                                                 self._stored(txid))
            if isinstance(action, ForceCommitted):
                await self.store.commit(txid, allowed=action.allowed)
                self.participant.on_committed(txid)
                log.info("recovery: blob %d committed", txid, extra={"txid": txid})
            elif isinstance(action, Drop):
                await self._drop_held(action)
                log.info("recovery: blob %d aborted, dropped", txid, extra={"txid": txid})

    async def maintain(self, ask_outcome: OutcomeAsker | None) -> None:
        """One round of timeouts: drop idle STAGED blobs (and drops that failed before), ask
        about unresolved PREPARED ones.

        ask_outcome(txid) returns the coordinator's "committed"/"aborted"/"inflight" or
        raises DfsError; None means there is no coordinator to ask.
        """
        reachable = ask_outcome is not None
        for action in self.participant.on_tick(self.clock()):
            if isinstance(action, Drop):
                log.info("blob %d idle too long (or its drop failed before): dropping",
                         action.txid, extra={"txid": action.txid})
                await self.drop(action)
            elif isinstance(action, AskOutcome):
                txid = action.txid
                if reachable and ask_outcome is not None:
                    try:
                        outcome = await ask_outcome(txid)
                    except DfsError as e:
                        log.info("outcome of %d unknown: %s", txid, e, extra={"txid": txid})
                        reachable = e.code != Code.UNAVAILABLE  # don't wait on the rest
                    else:
                        if outcome in OUTCOMES:
                            try:
                                await self.resolve(txid, outcome)
                                continue
                            except DfsError as e:
                                log.error("resolving %d as %s failed: %s", txid, outcome, e,
                                          extra={"txid": txid})
                        else:
                            log.warning("coordinator sent outcome %r for %d", outcome, txid,
                                        extra={"txid": txid})
                self.participant.on_outcome_failed(txid, self.clock())
