"""The coordinator side of presumed-abort two-phase commit, sans-IO (docs/design.md §5).

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

Replicas whose last STAGE carried the prepare fields have voted YES already (the client names
them in `voted`): request_commit sends PREPARE only to the others, and when every replica
voted, goes from STAGING through PREPARING straight to DECIDING (docs/design.md §5, rule 2).

Presumed abort: nothing is written for an abort, so a txid the machine forgot and the log never
recorded is aborted. The driver answers OUTCOME from the machine first (`is_committed`, then
`is_in_flight`, repairs included), then the log and the blob index (committed), then "unknown"
to a writer asking about a txid at or below the purge mark, else aborted. A participant asking
about its own copy hears "inflight" while a write or repair of the blob is undecided, then
"committed" only while the namespace lists that copy (CommitDriver.outcome).

The one obligation of presumed abort: a commit decision lives until every replica it lists has
durably acked COMMITTED. Nothing else ends it. A replica that refuses the COMMIT is not an ack:
it stays owed and is no longer sent COMMIT (`MarkBad`: the driver queues its repair); only a
later decision changes the listed set — a repair that re-makes the copy (owed again, COMMIT
re-sent) or drops it, or the removal of the node for good (`forget_node`, whose durable record
is the node table's REMOVED) — and then the acks of the new list end the record.

A multi-file transaction (a group) ties several write entries to one decision; its events
live in `dfs.twopc_group`. A repair is a transaction of the same machine, keyed by the blob id; its events live in
`dfs.twopc_repair` (mixed in here), the phases and actions in `dfs.twopc_types` (re-exported
here: drivers import them from this module).
"""

from __future__ import annotations

from collections.abc import Iterable

from dfs.errors import Code
from dfs.twopc_group import Group, GroupEvents
from dfs.twopc_repair import Repair, RepairEvents
from dfs.twopc_types import (
    Action,
    Entry,
    MarkBad,
    MemberCommit,
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

__all__ = ["Action", "CommitProtocol", "MarkBad", "MemberCommit", "Phase", "ReplyError",
           "ReplyOk", "SendAbort", "SendCommit", "SendPrepare", "WriteDecision", "WriteEnd",
           "WriteGroupDecision", "WriteRepairDecision"]

# NO votes that say something about the node rather than the write come back as these codes.
_PASSTHROUGH = {Code.ENOSPC, Code.CONFLICT, Code.ENOENT}


class CommitProtocol(RepairEvents, GroupEvents):
    """All transactions a coordinator incarnation knows of, past BEGIN and not yet ended."""

    def __init__(self) -> None:
        self._txns: dict[int, Entry] = {}
        self._repairs: dict[int, Repair] = {}
        self._groups: dict[int, Group] = {}
        # Nodes removed for good (forget_node): a decision written after a removal, of a
        # transaction begun before it, owes them no ack either.
        self._removed: set[int] = set()

    # -------------------------------------------------------------- queries

    def phase(self, txid: int) -> Phase | None:
        txn = self._txns.get(txid)
        return txn.phase if txn else None

    def is_in_flight(self, txid: int) -> bool:
        """Undecided and still able to commit (a write, or a repair of this blob): OUTCOME
        must answer 'ask again later'."""
        return self.phase(txid) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING) \
            or self._repairing(txid)

    def is_committed(self, txid: int) -> bool:
        """Decided and not yet ended (a write's or a repair's decision): COMMIT is owed."""
        return self.phase(txid) in (Phase.COMMITTING, Phase.ENDING)

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
        self._txns[txid] = Entry(txid, tuple(replicas))
        return []

    def request_commit(self, txid: int, size: int, checksum: bytes, nchunks: int,
                       voted: Iterable[int] = ()) -> list[Action]:
        """The client has staged every chunk and asks for the commit. `voted`: the replicas
        that already voted YES on this content, their last STAGE carrying the prepare fields
        (docs/design.md §5, rule 2): they are not sent PREPARE, and when all did, the machine
        goes straight to DECIDING. An id that is not one of this txid's replicas earns no
        vote (its replica, if any, is sent PREPARE as usual)."""
        txn = self._txns.get(txid)
        if txn is None:
            return [ReplyError(txid, Code.UNAVAILABLE, f"transaction {txid} is unknown or aborted")]
        if txn.phase is not Phase.STAGING:
            return []  # a duplicate request: the first one's reply answers it

        txn.phase = Phase.PREPARING
        txn.yes.update(n for n in voted if n in txn.replicas)
        if len(txn.yes) == len(txn.replicas):
            txn.phase = Phase.DECIDING
            return [WriteDecision(txid)]
        return [SendPrepare(n, txid, size, checksum, nchunks) for n in txn.replicas
                if n not in txn.yes]

    def vote(self, txid: int, node: int, yes: bool, code: Code = Code.UNAVAILABLE,
             msg: str = "") -> list[Action]:
        """A replica's vote; a failed or timed-out PREPARE call is a NO."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.PREPARING or node not in txn.replicas:
            return []  # late, duplicate or stray: the outcome is already settled
        code = code if code in _PASSTHROUGH else Code.UNAVAILABLE
        if txn.group:
            return self._member_voted(txn, node, yes, code, msg)
        if not yes:
            return self._abort(txn, code, f"replica {node} voted no: {msg or code.value}", (node,))
        txn.yes.add(node)
        txn.check()
        if len(txn.yes) == len(txn.replicas):
            txn.phase = Phase.DECIDING
            return [WriteDecision(txid)]
        return []

    def vote_timeout(self, txid: int) -> list[Action]:
        """The vote deadline passed: whoever has not voted YES counts as NO."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.PREPARING:
            return []
        if txn.group:
            return self._member_timed_out(txn)
        missing = tuple(n for n in txn.replicas if n not in txn.yes)
        return self._abort(txn, Code.UNAVAILABLE, f"no vote from replicas {list(missing)}", missing)

    def decision_written(self, txid: int) -> list[Action]:
        """The commit point has passed: the write is durable; tell the client, then replicas."""
        txn = self._txns[txid]
        assert txn.phase is Phase.DECIDING
        return [ReplyOk(txid), *self._committing(txn)]

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
        txn.check()
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
        return self._repair_after_end(txid)

    def forget_node(self, node: int) -> list[Action]:
        """The node was removed for good (durably, in the node table): no decision lists it
        any more, so it owes no ack; entries whose other replicas all acked end."""
        self._removed.add(node)
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
        txn = Entry(txid, tuple(replicas), Phase.COMMITTING, acked=set(acked) & set(replicas))
        self._txns[txid] = txn
        return self._maybe_end(txn) or self.commit_retry(txid)

    def excuse_ack(self, txid: int, node: int) -> list[Action]:
        """The namespace no longer lists `node` for this blob (a later decision superseded the
        blob or dropped the copy) and the node refused its COMMIT: it owes no ack any more."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING or node not in txn.refused:
            return []
        txn.refused.discard(node)
        txn.replicas = tuple(n for n in txn.replicas if n != node)
        return self._maybe_end(txn)

    # -------------------------------------------------------------- helpers

    def _committing(self, txn: Entry) -> list[Action]:
        """A decision was written: COMMIT is owed to every replica not removed meanwhile
        (re-replication makes the removed ones' copies elsewhere, as for forget_node)."""
        txn.phase = Phase.COMMITTING
        txn.replicas = tuple(n for n in txn.replicas if n not in self._removed)
        return [*(SendCommit(n, txn.txid) for n in txn.replicas), *self._maybe_end(txn)]

    def _maybe_end(self, txn: Entry) -> list[Action]:
        """Every listed replica acked, and no repair decision of this blob is being written
        (it may list more replicas): the record may end. Every change of a decided
        entry's lists passes here, so its invariants are asserted here."""
        txn.check()
        if txn.phase is not Phase.COMMITTING or any(n not in txn.acked for n in txn.replicas):
            return []
        if self._repair_deciding(txn.txid):
            return []  # repair_decision_written / _refused looks again
        txn.phase = Phase.ENDING
        return [WriteEnd(txn.txid)]

    def _abort(self, txn: Entry, code: Code, msg: str, failed: tuple[int, ...],
               *, reply: bool = True) -> list[Action]:
        del self._txns[txn.txid]
        actions: list[Action] = [SendAbort(n, txn.txid) for n in txn.replicas]
        if reply:
            actions.append(ReplyError(txn.txid, code, msg, failed))
        return actions
