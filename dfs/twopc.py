"""The coordinator side of presumed-abort two-phase commit, sans-IO (DESIGN.md §5).

`CommitProtocol` holds no sockets, clock or disk. A driver feeds it events (a client asked to
commit, a vote arrived, the decision is durable, a replica acked) and carries out the actions it
returns, in order. The real coordinator server and the simulator are two such drivers, which is
what lets a simulator prove the protocol.

Life of a transaction:

    begin ──> STAGING ──request_commit──> PREPARING ──all YES──> DECIDING
                 │                           │ NO / timeout          │ decision_written
                 └── abort / expire ─────────┴──> (gone: SendAbort)  v
                                                  ENDING <──all acked── COMMITTING
                                                     │ end_written
                                                     v (gone)

Presumed abort: nothing is written for an abort, so a txid the machine forgot and the log never
recorded is aborted. The driver answers OUTCOME from the machine first (`is_committed`, then
`is_in_flight`), then the log and the namespace (committed), else aborted.

The one obligation of presumed abort: a commit decision lives until every replica it lists has
durably acked COMMITTED. Nothing else ends it. A replica that refuses the COMMIT is not an ack:
it stays owed and is no longer sent COMMIT (`MarkBad`: the driver queues its repair); only a
later decision changes the listed set — a repair that re-makes the copy (owed again, COMMIT
re-sent) or drops it, or the removal of the node for good (`forget_node`, whose durable record
is the node table's REMOVED) — and then the acks of the new list end the record.

A repair is a transaction of the same machine, keyed by the blob id (the txid of the write that
made it), which keeps content and version and changes only where the copies live:

    begin_repair ──> PREPARING ──repair_prepared──> DECIDING ──repair_decision_written──> merged
                         │ no target ok               │ refused                     into COMMITTING
                         └──> (gone: SendAbort) <─────┘

The driver fetches and PREPAREs the targets itself (node to node), then reports. While the
repair is undecided its blob is in flight; its decision is written only while the blob's own
entry (the file's write, or an earlier repair) is not ENDING, and that entry does not start
ENDING while a repair decision is being written, so the log's writes of the two never cross.
The decision merges the targets into the COMMITTING entry: they owe a (new) ack, replicas the
repair dropped owe nothing any more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dfs.errors import Code


class Phase(enum.Enum):
    STAGING = "staging"
    PREPARING = "preparing"
    DECIDING = "deciding"
    COMMITTING = "committing"
    ENDING = "ending"


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class SendPrepare:
    node: int
    txid: int
    size: int
    checksum: bytes
    nchunks: int


@dataclass(frozen=True)
class SendCommit:
    node: int
    txid: int


@dataclass(frozen=True)
class SendAbort:
    node: int
    txid: int


@dataclass(frozen=True)
class WriteDecision:
    """Force, in ONE transaction, the COMMITTED record and the inode's switch to this txid.

    The driver reports back `decision_written` or, if the namespace refuses (the file moved on
    under if_version, or is gone), `decision_refused`.
    """

    txid: int


@dataclass(frozen=True)
class WriteEnd:
    """Every replica acked: the driver marks the record ENDED (no force needed)."""

    txid: int


@dataclass(frozen=True)
class WriteRepairDecision:
    """Force the repair's decision: the replica switch and the blob's COMMITTED record for the
    targets, in one transaction. The driver reports `repair_decision_written` or
    `repair_decision_refused` (the file moved on)."""

    blob: int
    targets: tuple[int, ...]


@dataclass(frozen=True)
class MarkBad:
    """`node` refused the COMMIT of txid: its copy is bad or gone. The driver queues its
    repair; the decision stays, and the node stays owed until a decision re-lists or drops it."""

    txid: int
    node: int
    reason: str


@dataclass(frozen=True)
class ReplyOk:
    txid: int


@dataclass(frozen=True)
class ReplyError:
    txid: int
    code: Code
    msg: str
    failed: tuple[int, ...] = ()


Action = (SendPrepare | SendCommit | SendAbort | WriteDecision | WriteEnd | WriteRepairDecision
          | MarkBad | ReplyOk | ReplyError)


# ------------------------------------------------------------------ state


@dataclass
class _Txn:
    txid: int
    replicas: tuple[int, ...]
    phase: Phase = Phase.STAGING
    yes: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)  # owed, but COMMIT is not re-sent (MarkBad)


@dataclass
class _Repair:
    blob: int
    targets: tuple[int, ...]
    new: frozenset[int]  # targets not listed now: their copies are aborted if they fail
    phase: Phase = Phase.PREPARING
    ok: tuple[int, ...] = ()
    prepared: tuple[int, ...] = ()  # copies this repair PREPAREd (aborted if it is refused)
    waiting: bool = False  # decided, held back while the blob's entry is ENDING


# NO votes that say something about the node rather than the write come back as these codes.
_PASSTHROUGH = {Code.ENOSPC, Code.CONFLICT, Code.ENOENT}


class CommitProtocol:
    """All transactions a coordinator incarnation knows of, past BEGIN and not yet ended."""

    def __init__(self) -> None:
        self._txns: dict[int, _Txn] = {}
        self._repairs: dict[int, _Repair] = {}

    # -------------------------------------------------------------- queries

    def phase(self, txid: int) -> Phase | None:
        txn = self._txns.get(txid)
        return txn.phase if txn else None

    def is_in_flight(self, txid: int) -> bool:
        """Undecided and still able to commit (a write, or a repair of this blob): OUTCOME
        must answer 'ask again later'."""
        return self.phase(txid) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING) \
            or txid in self._repairs

    def is_committed(self, txid: int) -> bool:
        """Decided and not yet ended (a write's or a repair's decision): COMMIT is owed."""
        return self.phase(txid) in (Phase.COMMITTING, Phase.ENDING)

    def repair_phase(self, txid: int) -> Phase | None:
        repair = self._repairs.get(txid)
        return repair.phase if repair else None

    def refused(self, txid: int) -> tuple[int, ...]:
        txn = self._txns.get(txid)
        return tuple(sorted(txn.refused)) if txn else ()

    def replicas(self, txid: int) -> tuple[int, ...]:
        txn = self._txns.get(txid)
        return txn.replicas if txn else ()

    def unacked(self, txid: int) -> tuple[int, ...]:
        txn = self._txns.get(txid)
        if txn is None:
            return ()
        return tuple(n for n in txn.replicas if n not in txn.acked)

    def transactions(self) -> list[tuple[int, Phase, tuple[int, ...], frozenset[int]]]:
        return [(t.txid, t.phase, t.replicas, frozenset(t.acked)) for t in self._txns.values()]

    # -------------------------------------------------------------- events

    def begin(self, txid: int, replicas: list[int] | tuple[int, ...]) -> list[Action]:
        if txid in self._txns:
            raise ValueError(f"txid {txid} begun twice")
        self._txns[txid] = _Txn(txid, tuple(replicas))
        return []

    def request_commit(self, txid: int, size: int, checksum: bytes, nchunks: int) -> list[Action]:
        """The client has staged every chunk and asks for the commit."""
        txn = self._txns.get(txid)
        if txn is None:
            return [ReplyError(txid, Code.UNAVAILABLE, f"transaction {txid} is unknown or aborted")]
        if txn.phase is not Phase.STAGING:
            return []  # a duplicate request: the first one's reply answers it

        txn.phase = Phase.PREPARING
        return [SendPrepare(n, txid, size, checksum, nchunks) for n in txn.replicas]

    def vote(self, txid: int, node: int, yes: bool, code: Code = Code.UNAVAILABLE,
             msg: str = "") -> list[Action]:
        """A replica's vote; a failed or timed-out PREPARE call is a NO."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.PREPARING or node not in txn.replicas:
            return []  # late, duplicate or stray: the outcome is already settled
        if not yes:
            code = code if code in _PASSTHROUGH else Code.UNAVAILABLE
            return self._abort(txn, code, f"replica {node} voted no: {msg or code.value}", (node,))
        txn.yes.add(node)
        if len(txn.yes) == len(txn.replicas):
            txn.phase = Phase.DECIDING
            return [WriteDecision(txid)]
        return []

    def vote_timeout(self, txid: int) -> list[Action]:
        """The vote deadline passed: whoever has not voted YES counts as NO."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.PREPARING:
            return []
        missing = tuple(n for n in txn.replicas if n not in txn.yes)
        return self._abort(txn, Code.UNAVAILABLE, f"no vote from replicas {list(missing)}", missing)

    def decision_written(self, txid: int) -> list[Action]:
        """The commit point has passed: the write is durable; tell the client, then replicas."""
        txn = self._txns[txid]
        assert txn.phase is Phase.DECIDING
        txn.phase = Phase.COMMITTING
        return [ReplyOk(txid), *(SendCommit(n, txid) for n in txn.replicas)]

    def decision_refused(self, txid: int, code: Code, msg: str) -> list[Action]:
        txn = self._txns[txid]
        assert txn.phase is Phase.DECIDING
        return self._abort(txn, code, msg, ())

    def commit_acked(self, txid: int, node: int) -> list[Action]:
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING or node not in txn.replicas \
                or node in txn.refused:
            return []  # a refused replica owes an ack of a re-made copy, after its repair
        txn.acked.add(node)
        return self._maybe_end(txn)

    def commit_refused(self, txid: int, node: int, code: Code, msg: str = "") -> list[Action]:
        """`node` answered COMMIT with an error retrying cannot get past: not an ack."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING or node not in txn.replicas \
                or node in txn.acked or node in txn.refused:
            return []
        txn.refused.add(node)
        return [MarkBad(txid, node, f"refused COMMIT: {msg or code.value}")]

    def commit_retry(self, txid: int) -> list[Action]:
        """Time to re-send COMMIT to replicas that have not acked (rule 3), but not to those
        that refused it: their repair re-makes the copy and sends COMMIT again."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING:
            return []
        return [SendCommit(n, txid) for n in txn.replicas
                if n not in txn.acked and n not in txn.refused]

    def end_written(self, txid: int) -> list[Action]:
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.ENDING:
            return []
        del self._txns[txid]
        repair = self._repairs.get(txid)
        if repair is not None and repair.waiting:
            repair.waiting = False
            return [WriteRepairDecision(txid, repair.ok)]
        return []

    def forget_node(self, node: int) -> list[Action]:
        """The node was removed for good (durably, in the node table): no decision lists it
        any more, so it owes no ack; entries whose other replicas all acked end."""
        actions: list[Action] = []
        for txn in list(self._txns.values()):
            if txn.phase is Phase.COMMITTING and node in txn.replicas \
                    and node not in txn.acked:
                txn.replicas = tuple(n for n in txn.replicas if n != node)
                txn.refused.discard(node)
                actions += self._maybe_end(txn)
        return actions

    def abort(self, txid: int, reason: str = "aborted by the client") -> list[Action]:
        """The client gave up, or its transaction expired, before asking to commit."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.STAGING:
            return []
        return self._abort(txn, Code.UNAVAILABLE, reason, (), reply=False)

    def recover(self, txid: int, replicas: list[int] | tuple[int, ...],
                acked: list[int] | tuple[int, ...] = ()) -> list[Action]:
        """After a restart: a COMMITTED-not-ENDED record from the log (rule 3)."""
        txn = _Txn(txid, tuple(replicas), Phase.COMMITTING, acked=set(acked) & set(replicas))
        self._txns[txid] = txn
        return self._maybe_end(txn) or self.commit_retry(txid)

    # -------------------------------------------------------------- repairs

    def begin_repair(self, blob: int, targets: list[int] | tuple[int, ...],
                     new: list[int] | tuple[int, ...] = ()) -> list[Action]:
        """A repair of `blob` starts copying to `targets` (`new`: those not listed now)."""
        if blob in self._repairs:
            raise ValueError(f"blob {blob} is being repaired already")
        if self.phase(blob) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING):
            raise ValueError(f"blob {blob} is an undecided write, not a file's blob")
        self._repairs[blob] = _Repair(blob, tuple(targets), frozenset(new))
        return []

    def repair_prepared(self, blob: int, prepared: list[int] | tuple[int, ...],
                        have: list[int] | tuple[int, ...] = ()) -> list[Action]:
        """The copies are done: `prepared` targets voted YES on a copy this repair made,
        `have` targets already held a good one; the rest failed (new ones are aborted)."""
        repair = self._repairs.get(blob)
        if repair is None or repair.phase is not Phase.PREPARING:
            return []
        ok = tuple(n for n in repair.targets if n in prepared or n in have)
        actions: list[Action] = [SendAbort(n, blob) for n in repair.targets
                                 if n in repair.new and n not in ok]
        if not ok:
            del self._repairs[blob]
            return actions
        repair.phase, repair.ok = Phase.DECIDING, ok
        repair.prepared = tuple(n for n in ok if n in prepared)
        if self.phase(blob) is Phase.ENDING:
            repair.waiting = True  # end_written hands it on
            return actions
        return [*actions, WriteRepairDecision(blob, ok)]

    def repair_decision_written(self, blob: int, replicas: list[int] | tuple[int, ...]
                                ) -> list[Action]:
        """The repair's commit point has passed; `replicas` is the file's new list. The targets
        join the blob's COMMITTING entry (created if the file's own record ended long ago) and
        owe an ack; replicas no longer listed owe none. Returns the COMMITs to send."""
        repair = self._repairs.pop(blob)
        assert repair.phase is Phase.DECIDING and not repair.waiting
        listed = set(replicas)
        txn = self._txns.get(blob)
        if txn is None:
            txn = self._txns[blob] = _Txn(blob, repair.ok, Phase.COMMITTING)
        else:  # COMMITTING (ENDING cannot be: its decision waited for end_written)
            txn.phase = Phase.COMMITTING
            txn.replicas = (*(n for n in txn.replicas if n in listed or n in repair.ok),
                            *(n for n in repair.ok if n not in txn.replicas))
            txn.acked = {n for n in txn.acked if n in txn.replicas and n not in repair.ok}
            txn.refused = {n for n in txn.refused if n in txn.replicas and n not in repair.ok}
        return [*(SendCommit(n, blob) for n in repair.ok), *self._maybe_end(txn)]

    def repair_decision_refused(self, blob: int) -> list[Action]:
        """The file moved on before the decision: drop the copies this repair prepared."""
        repair = self._repairs.pop(blob, None)
        if repair is None:
            return []
        actions: list[Action] = [SendAbort(n, blob) for n in repair.prepared]
        txn = self._txns.get(blob)
        if txn is not None:
            actions += self._maybe_end(txn)  # acks that came in meanwhile may end it now
        return actions

    def repair_abandoned(self, blob: int) -> list[Action]:
        """The repair gave up before its decision write was asked for (an error, or it waited
        too long for the blob's entry to end): its copies are aborted as if refused."""
        repair = self._repairs.get(blob)
        if repair is None:
            return []
        if repair.phase is Phase.PREPARING:
            del self._repairs[blob]
            return [SendAbort(n, blob) for n in repair.targets if n in repair.new]
        if repair.waiting:
            repair.waiting = False
            return self.repair_decision_refused(blob)
        return []  # its decision is being written: that write's outcome settles it

    def release(self, txid: int, node: int) -> list[Action]:
        """The namespace no longer lists `node` for this blob (a later decision superseded the
        blob or dropped the copy) and the node refused its COMMIT: it owes no ack any more."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING or node not in txn.refused:
            return []
        txn.refused.discard(node)
        txn.replicas = tuple(n for n in txn.replicas if n != node)
        return self._maybe_end(txn)

    # -------------------------------------------------------------- helpers

    def _maybe_end(self, txn: _Txn) -> list[Action]:
        """Every listed replica acked, and no repair decision of this blob is being written
        (it may list more replicas): the record may end."""
        if txn.phase is not Phase.COMMITTING or any(n not in txn.acked for n in txn.replicas):
            return []
        repair = self._repairs.get(txn.txid)
        if repair is not None and repair.phase is Phase.DECIDING:
            return []  # repair_decision_written / _refused looks again
        txn.phase = Phase.ENDING
        return [WriteEnd(txn.txid)]

    def _abort(self, txn: _Txn, code: Code, msg: str, failed: tuple[int, ...],
               *, reply: bool = True) -> list[Action]:
        del self._txns[txn.txid]
        actions: list[Action] = [SendAbort(n, txn.txid) for n in txn.replicas]
        if reply:
            actions.append(ReplyError(txn.txid, code, msg, failed))
        return actions
