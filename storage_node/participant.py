"""The participant side of presumed-abort 2PC (docs/design.md §5, rules 2, 4 and 5), sans-IO.

A plain class in the style of h11: no sockets, clock or disk. The driver (storage_node.server)
feeds it events and carries out the actions it returns against the BlobStore.

Durable state (STAGED / PREPARED / COMMITTED) lives in the store, and the driver passes what
the store holds (`stored`) with every event, so the two can never disagree. The participant
keeps what the store doesn't: which txids were aborted (so a late PREPARE votes NO and a late
STAGE is refused), when each STAGED txid was last active (to drop abandoned ones), which txid
is being prepared right now, and when to ask the coordinator about a PREPARED txid whose
outcome hasn't arrived (after a restart at once; otherwise after `outcome_after_s` seconds).
COMMITTED is final and needs no memory: the store answers for it.

The participant is the only owner of the node's state rules: which stored states may take a
chunk (STAGEABLE), be committed (COMMITTABLE), be dropped (DROPPABLE; never COMMITTED) or be
read (SERVABLE). Its
actions carry them, and the store only checks, inside its write transaction, that the blob is
still in a state the action allows (the decision was taken on a read just before).

Presumed abort of leftovers: a STAGED blob whose txid the coordinator no longer knows (not open,
not being committed or repaired, no decision logged) can never commit. The node names its
STAGED txids idle for `leftover_age_s` seconds (all of them, at once, after it learns that the
coordinator restarted: a new incarnation) in its heartbeats, at most `leftover_batch` per beat;
the txids the coordinator answers unknown are dropped right away (`on_presumed_aborted`),
without waiting for `staged_timeout_s`. PREPARED blobs are asked about (OUTCOME) at once after a
coordinator restart.

A drop the store could not carry out (a full disk) is not forgotten: the participant already
counts the txid as aborted, so nothing else would ever come back to it; `on_drop_failed`
schedules it again (with backoff) until the store has room.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

from dfs.errors import Code, DfsError


class BlobState(enum.StrEnum):
    """A blob's state in the node's store (storage_node/layout.py records it), and the only
    states these rules know; an abort leaves no record (`Participant.aborted` remembers it)."""

    STAGED = "STAGED"
    PREPARED = "PREPARED"
    COMMITTED = "COMMITTED"


#: Stored states (None: no record yet) a chunk may be staged into: staging stops at PREPARED.
STAGEABLE: frozenset[str | None] = frozenset({None, BlobState.STAGED})
#: Stored states a COMMIT moves to COMMITTED (a COMMITTED blob is acked again, unchanged).
COMMITTABLE: frozenset[str | None] = frozenset({BlobState.PREPARED})
#: Stored states a drop may take. Never COMMITTED: only GC deletes a committed blob.
DROPPABLE: frozenset[str | None] = frozenset({None, BlobState.STAGED, BlobState.PREPARED})
#: Stored states a reader may be served from (rule 6: PREPARED too; never STAGED).
SERVABLE: frozenset[str | None] = frozenset({BlobState.PREPARED, BlobState.COMMITTED})
#: A presumed-abort drop takes only a STAGED blob (a PREPARED one waits for OUTCOME).
UNPREPARED: frozenset[str | None] = frozenset({None, BlobState.STAGED})

#: STAGED txids idle this long are named in heartbeats (seconds).
LEFTOVER_AGE_S = 2.0
#: At most this many txids per heartbeat.
LEFTOVER_BATCH = 256
#: Seconds before the same txid is named again.
LEFTOVER_REASK_S = 1.0
#: First wait before a failed drop is tried again (doubling up to outcome_retry_max_s).
DROP_RETRY = 0.5


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer ok: a YES vote, a commit/abort ack, a stored chunk."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer with an error (for PREPARE: vote NO)."""

    code: Code
    msg: str

    def error(self) -> DfsError:
        return DfsError(self.code, self.msg)


@dataclass(frozen=True, slots=True)
class StoreChunk:
    """Write the chunk (unforced) while the blob is in one of `allowed`, then report
    `on_staged`."""

    txid: int
    allowed: frozenset[str | None] = field(default=STAGEABLE, compare=False)


@dataclass(frozen=True, slots=True)
class ForcePrepared:
    """Verify the chunks and force PREPARED, then report `on_prepared` / `on_prepare_failed`."""

    txid: int


@dataclass(frozen=True, slots=True)
class StageAndPrepare:
    """Store the chunk AND verify the blob and force PREPARED, in ONE durable write, while the
    blob is in one of `allowed`; then report `on_prepared` (vote YES) / `on_prepare_failed`
    (vote NO). A STAGE that carries the prepare fields (docs/design.md §5, rule 2)."""

    txid: int
    allowed: frozenset[str | None] = field(default=STAGEABLE, compare=False)


@dataclass(frozen=True, slots=True)
class ForceCommitted:
    """Force COMMITTED (from a state in `allowed`), then report `on_committed` (and ack, if a
    COMMIT asked for it)."""

    txid: int
    allowed: frozenset[str | None] = field(default=COMMITTABLE, compare=False)


@dataclass(frozen=True, slots=True)
class Drop:
    """Delete the blob and its chunks if it is (still) in one of `allowed`."""

    txid: int
    allowed: frozenset[str | None] = field(default=DROPPABLE, compare=False)


@dataclass(frozen=True, slots=True)
class AskOutcome:
    """Ask the coordinator OUTCOME(txid), then report `on_outcome` / `on_outcome_failed`."""

    txid: int


Action = (Reply | Refuse | StoreChunk | StageAndPrepare | ForcePrepared | ForceCommitted | Drop
          | AskOutcome)

OUTCOMES = ("committed", "aborted", "inflight")
#: What a PREPARE asks a blob to hold, and what a prepared one holds: (size, checksum, nchunks).
Shape = tuple[int, bytes, int]


@dataclass(slots=True)
class _Tx:
    state: BlobState  # STAGED or PREPARED
    active: float  # STAGED: last stage; PREPARED: when it became prepared
    preparing: bool = False
    next_ask: float = float("inf")
    retry: float = 0.0
    suspect: bool = False  # STAGED before a coordinator restart: name it in the next beat
    next_name: float = 0.0  # STAGED: not named in a heartbeat again before this


class Participant:
    """Per-txid decisions of one storage node."""

    def __init__(
        self,
        *,
        staged_timeout_s: float = 300.0,
        outcome_after_s: float = 10.0,
        outcome_retry_max_s: float = 10.0,
        remember_aborted: int = 100_000,
        leftover_age_s: float = LEFTOVER_AGE_S,
        leftover_batch: int = LEFTOVER_BATCH,
    ) -> None:
        self.staged_timeout_s = staged_timeout_s
        self.outcome_after_s = outcome_after_s
        self.outcome_retry_max_s = outcome_retry_max_s
        self.remember_aborted = remember_aborted
        self.leftover_age_s = leftover_age_s
        self.leftover_batch = leftover_batch
        self.incarnation: int | None = None  # the coordinator's, as last heard
        self._txns: dict[int, _Tx] = {}
        self._aborted: OrderedDict[int, None] = OrderedDict()
        self._named: dict[int, _Tx] = {}  # the last heartbeat's txids, as they were then
        # Drops the store failed to carry out: txid -> (allowed states, when, backoff).
        self._redrop: dict[int, tuple[frozenset[str | None], float, float]] = {}

    # ------------------------------------------------------------ views

    def state(self, txid: int) -> BlobState | None:
        """The state of a txid in flight here, STAGED or PREPARED (None: nothing in flight,
        or aborted; COMMITTED is final and the store answers for it)."""
        tx = self._txns.get(txid)
        return tx.state if tx else None

    def aborted(self, txid: int) -> bool:
        """Whether this participant remembers txid as aborted (a late STAGE or PREPARE of it
        is refused)."""
        return txid in self._aborted

    def in_flight(self) -> dict[int, BlobState]:
        return {txid: tx.state for txid, tx in self._txns.items()}

    def idle(self, txid: int, now: float) -> float | None:
        """Seconds since txid was last active here (STAGED: staged; PREPARED: prepared)."""
        tx = self._txns.get(txid)
        return None if tx is None else max(0.0, now - tx.active)

    def cleanup_horizon(self, state: str, heartbeat: float) -> float:
        """How long a leftover in `state` may be idle here, with the coordinator reachable,
        before this participant has resolved it (the checker's "cleanup in progress")."""
        if state == BlobState.STAGED:
            return self.leftover_age_s + LEFTOVER_REASK_S + 4 * heartbeat
        return self.outcome_after_s + self.outcome_retry_max_s + 4 * heartbeat

    # ------------------------------------------------------------ restart

    def restore(self, txid: int, stored: str, created: float, now: float) -> None:
        """A blob found in the store at start: STAGED ages from `created`; PREPARED is asked
        about at once (rule 4)."""
        if stored == BlobState.STAGED:
            # Named at the first beat: the coordinator may have restarted meanwhile too.
            self._txns[txid] = _Tx(BlobState.STAGED, active=created, suspect=True)
        elif stored == BlobState.PREPARED:
            self._txns[txid] = _Tx(BlobState.PREPARED, active=now, next_ask=now, retry=0.5)

    # ------------------------------------------------------------ STAGE

    def on_stage(self, txid: int, stored: str | None, now: float) -> StoreChunk | Refuse:
        if txid in self._aborted:
            return Refuse(Code.CONFLICT, f"transaction {txid} was aborted")
        if stored not in STAGEABLE:
            return Refuse(Code.CONFLICT, f"blob {txid} is {stored}; staging refused")
        tx = self._txns.get(txid)
        if tx is None:
            self._txns[txid] = _Tx(BlobState.STAGED, active=now)
        elif tx.preparing:
            return Refuse(Code.CONFLICT, f"blob {txid} is being prepared; staging refused")
        else:
            tx.active = now
        return StoreChunk(txid)

    def on_staged(self, txid: int) -> Drop | None:
        """The chunk is stored. An ABORT that overtook the write means it must go again."""
        return Drop(txid) if txid in self._aborted else None

    # ------------------------------------------------------------ PREPARE

    def on_prepare(self, txid: int, stored: str | None, nchunks: int, *,
                   held: Shape | None = None, wanted: Shape | None = None
                   ) -> ForcePrepared | Reply | Refuse:
        """A PREPARED/COMMITTED blob votes YES again, with nothing to force, if the content it
        holds (`held`: its size, checksum, nchunks) is the content asked for (`wanted`), and
        NO if not; an aborted or unknown txid votes NO (an empty blob, nchunks 0, needs
        nothing staged); a STAGED one is verified and forced."""
        if stored in (BlobState.PREPARED, BlobState.COMMITTED):
            if held != wanted:
                return Refuse(Code.CONFLICT, f"blob {txid} is {stored} with other content")
            return Reply()
        if txid in self._aborted:
            return Refuse(Code.CONFLICT, f"transaction {txid} was aborted")
        if stored is None and nchunks:
            return Refuse(Code.ENOENT, f"blob {txid}: nothing staged")
        tx = self._txns.setdefault(txid, _Tx(BlobState.STAGED, active=0.0))
        tx.preparing = True
        return ForcePrepared(txid)

    def on_stage_prepare(self, txid: int, stored: str | None, nchunks: int, now: float, *,
                         held: Shape | None = None, wanted: Shape | None = None
                         ) -> StageAndPrepare | ForcePrepared | Reply | Refuse:
        """A STAGE of a blob's last chunk that carries the prepare fields (docs/design.md §5,
        rule 2): the chunk and the vote in one forced write. Nothing new is ruled here: a blob
        already PREPARED/COMMITTED votes again as PREPARE would; otherwise the chunk is taken or refused as STAGE would, and the blob is
        being prepared from then on, as after PREPARE. The outcome is reported as for PREPARE
        (`on_prepared`: YES, and the OUTCOME timer starts; `on_prepare_failed`: NO)."""
        if stored in (BlobState.PREPARED, BlobState.COMMITTED):
            return self.on_prepare(txid, stored, nchunks, held=held, wanted=wanted)
        action = self.on_stage(txid, stored, now)
        if isinstance(action, Refuse):
            return action
        self._txns[txid].preparing = True
        return StageAndPrepare(txid, action.allowed)

    def on_prepared(self, txid: int, now: float) -> Reply:
        """PREPARED is forced: vote YES, and ask the coordinator later if no decision comes."""
        tx = self._txns.get(txid)
        if tx is not None:
            tx.preparing = False
            if tx.state == BlobState.STAGED:
                tx.state = BlobState.PREPARED
                tx.active = now
                tx.next_ask = now + self.outcome_after_s
                tx.retry = 1.0
        return Reply()

    def on_prepare_failed(self, txid: int, now: float) -> None:
        tx = self._txns.get(txid)
        if tx is not None and tx.preparing:
            tx.preparing = False
            tx.active = now

    # ------------------------------------------------------------ COMMIT

    def on_commit(self, txid: int, stored: str | None) -> Reply | ForceCommitted | Refuse:
        """PREPARED commits; COMMITTED acks again (idempotent). Anything else is refused: an
        ack ends the decision, so only a node holding the copy may give it. A blob with no
        record here (its PREPARED copy was lost, or GC deleted it after a later write
        superseded it) is ENOENT: the coordinator marks the replica bad and repairs it, or
        releases it when the namespace no longer lists it (docs/design.md §5, rule 5)."""
        if stored in COMMITTABLE:
            return ForceCommitted(txid)
        if stored == BlobState.COMMITTED:
            self._txns.pop(txid, None)
            return Reply()
        if stored == BlobState.STAGED:
            return Refuse(Code.CONFLICT, f"blob {txid} is not prepared")
        if txid in self._aborted:
            return Refuse(Code.CONFLICT, f"transaction {txid} was aborted")
        self._txns.pop(txid, None)  # nothing left to ask OUTCOME about
        return Refuse(Code.ENOENT, f"blob {txid} not here; COMMIT refused")

    def on_committed(self, txid: int) -> Reply:
        self._txns.pop(txid, None)
        return Reply()

    # ------------------------------------------------------------ ABORT

    def on_abort(self, txid: int, stored: str | None) -> Drop | Refuse:
        """Drop STAGED/PREPARED and remember the abort; never touch a COMMITTED blob."""
        if stored not in DROPPABLE:
            return Refuse(Code.CONFLICT, f"blob {txid} is {stored}; abort refused")
        self._forget_as_aborted(txid)
        return Drop(txid)

    def on_deleted(self, txid: int) -> None:
        """The blob was deleted (GC): nothing left to time out or ask about."""
        self._txns.pop(txid, None)
        self._redrop.pop(txid, None)

    def forget(self, txid: int) -> None:
        """Forget everything about txid, an earlier abort included: a repair is about to stage
        this (committed) blob afresh from another replica's bytes."""
        self._txns.pop(txid, None)
        self._aborted.pop(txid, None)
        self._redrop.pop(txid, None)

    def on_dropped(self, txid: int) -> None:
        """A Drop was carried out (or found nothing it may take): no retry is owed."""
        self._redrop.pop(txid, None)

    def on_drop_failed(self, action: Drop, now: float) -> None:
        """The store could not carry out a Drop (disk full, I/O error): try it again later.
        The txid stays aborted, so a late STAGE or PREPARE is still refused meanwhile."""
        _, _, backoff = self._redrop.get(action.txid, (action.allowed, 0.0, DROP_RETRY / 2))
        backoff = min(backoff * 2, self.outcome_retry_max_s)
        self._redrop[action.txid] = (action.allowed, now + backoff, backoff)

    # ------------------------------------------------------------ time and recovery

    def on_tick(self, now: float) -> list[Drop | AskOutcome]:
        """Drop STAGED txids idle for staged_timeout_s; ask about PREPARED ones that are due;
        try failed drops again when due."""
        actions: list[Drop | AskOutcome] = []
        for txid, (allowed, due, backoff) in self._redrop.items():
            if now >= due:
                self._redrop[txid] = (allowed, float("inf"), backoff)  # until reported
                actions.append(Drop(txid, allowed))
        for txid, tx in list(self._txns.items()):
            if tx.state == BlobState.STAGED:
                if not tx.preparing and now - tx.active > self.staged_timeout_s:
                    self._forget_as_aborted(txid)
                    actions.append(Drop(txid, UNPREPARED))
            elif now >= tx.next_ask:
                tx.next_ask = float("inf")  # until the answer (or its failure) is reported
                actions.append(AskOutcome(txid))
        return actions

    def on_outcome(self, txid: int, outcome: str, now: float, stored: str | None = None
                   ) -> ForceCommitted | Drop | None:
        """The coordinator's answer: committed -> commit; aborted -> drop; else ask later.
        Nothing for a blob no longer PREPARED here (`stored`, None: not asked)."""
        tx = self._txns.get(txid)
        if tx is None or tx.state != BlobState.PREPARED:
            return None  # resolved meanwhile by a COMMIT or ABORT
        if stored is not None and stored != BlobState.PREPARED:
            self._txns.pop(txid, None)  # COMMITTED is final: the store answers for it
            return None
        if outcome == "committed":
            return ForceCommitted(txid)
        if outcome == "aborted":
            self._forget_as_aborted(txid)
            return Drop(txid)
        self.on_outcome_failed(txid, now)
        return None

    def on_outcome_failed(self, txid: int, now: float) -> None:
        """No answer (coordinator unreachable) or still in flight: ask again later."""
        tx = self._txns.get(txid)
        if tx is not None and tx.state == BlobState.PREPARED:
            tx.next_ask = now + tx.retry
            tx.retry = min(max(tx.retry, 0.25) * 2, self.outcome_retry_max_s)

    # ------------------------------------------------------------ presumed abort of leftovers

    def on_incarnation(self, incarnation: int, now: float) -> bool:
        """The coordinator's incarnation, from a register or heartbeat reply. A new one (it
        restarted, and forgot the transactions it had open): every STAGED txid is named in the
        next beat and every PREPARED one asked about at once. True if it changed."""
        if incarnation == self.incarnation:
            return False
        self.incarnation = incarnation
        for tx in self._txns.values():
            if tx.state == BlobState.STAGED:
                tx.suspect, tx.next_name = True, 0.0
            elif tx.next_ask != float("inf"):  # not being asked right now
                tx.next_ask, tx.retry = now, 0.5
        return True

    def leftovers_to_name(self, now: float) -> list[int]:
        """STAGED txids for the next heartbeat (idle ones, or older than a coordinator
        restart), at most leftover_batch; the answer goes to `on_presumed_aborted`."""
        self._named = {}
        for txid, tx in self._txns.items():
            if len(self._named) >= self.leftover_batch:
                break
            if tx.state != BlobState.STAGED or tx.preparing or now < tx.next_name:
                continue
            if tx.suspect or now - tx.active >= self.leftover_age_s:
                tx.next_name = now + LEFTOVER_REASK_S
                self._named[txid] = tx
        return list(self._named)

    def on_presumed_aborted(self, txid: int) -> Drop | None:
        """The coordinator does not know txid (a heartbeat reply): presumed abort, drop it now.
        Only the STAGED record that was named: one re-staged since (a repair's fetch starts
        afresh) or being prepared is kept."""
        tx = self._txns.get(txid)
        if tx is None or tx is not self._named.get(txid) or tx.state != BlobState.STAGED \
                or tx.preparing:
            return None
        self._named.pop(txid, None)
        self._forget_as_aborted(txid)
        return Drop(txid, UNPREPARED)

    def _forget_as_aborted(self, txid: int) -> None:
        self._txns.pop(txid, None)
        self._aborted[txid] = None
        self._aborted.move_to_end(txid)
        while len(self._aborted) > self.remember_aborted:
            self._aborted.popitem(last=False)
