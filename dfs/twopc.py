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
recorded is aborted. The driver answers OUTCOME from the log first (committed), then
`is_in_flight` (in flight), else aborted.
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
class ReplyOk:
    txid: int


@dataclass(frozen=True)
class ReplyError:
    txid: int
    code: Code
    msg: str
    failed: tuple[int, ...] = ()


Action = SendPrepare | SendCommit | SendAbort | WriteDecision | WriteEnd | ReplyOk | ReplyError


# ------------------------------------------------------------------ state


@dataclass
class _Txn:
    txid: int
    replicas: tuple[int, ...]
    phase: Phase = Phase.STAGING
    yes: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)


# NO votes that say something about the node rather than the write come back as these codes.
_PASSTHROUGH = {Code.ENOSPC, Code.CONFLICT, Code.ENOENT}


class CommitProtocol:
    """All transactions a coordinator incarnation knows of, past BEGIN and not yet ended."""

    def __init__(self) -> None:
        self._txns: dict[int, _Txn] = {}

    # -------------------------------------------------------------- queries

    def phase(self, txid: int) -> Phase | None:
        txn = self._txns.get(txid)
        return txn.phase if txn else None

    def is_in_flight(self, txid: int) -> bool:
        """Undecided and still able to commit: OUTCOME must answer 'ask again later'."""
        return self.phase(txid) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING)

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
        if txn is None or txn.phase is not Phase.COMMITTING or node not in txn.replicas:
            return []
        txn.acked.add(node)
        if len(txn.acked) == len(txn.replicas):
            txn.phase = Phase.ENDING
            return [WriteEnd(txid)]
        return []

    def commit_retry(self, txid: int) -> list[Action]:
        """Time to re-send COMMIT to replicas that have not acked (rule 3)."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.COMMITTING:
            return []
        return [SendCommit(n, txid) for n in txn.replicas if n not in txn.acked]

    def end_written(self, txid: int) -> list[Action]:
        self._txns.pop(txid, None)
        return []

    def abort(self, txid: int, reason: str = "aborted by the client") -> list[Action]:
        """The client gave up, or its transaction expired, before asking to commit."""
        txn = self._txns.get(txid)
        if txn is None or txn.phase is not Phase.STAGING:
            return []
        return self._abort(txn, Code.UNAVAILABLE, reason, (), reply=False)

    def recover(self, txid: int, replicas: list[int] | tuple[int, ...],
                acked: list[int] | tuple[int, ...] = ()) -> list[Action]:
        """After a restart: a COMMITTED-not-ENDED record from the log (rule 3)."""
        txn = _Txn(txid, tuple(replicas), Phase.COMMITTING, acked=set(acked))
        self._txns[txid] = txn
        if len(txn.acked) == len(txn.replicas):
            txn.phase = Phase.ENDING
            return [WriteEnd(txid)]
        return self.commit_retry(txid)

    # -------------------------------------------------------------- helpers

    def _abort(self, txn: _Txn, code: Code, msg: str, failed: tuple[int, ...],
               *, reply: bool = True) -> list[Action]:
        del self._txns[txn.txid]
        actions: list[Action] = [SendAbort(n, txn.txid) for n in txn.replicas]
        if reply:
            actions.append(ReplyError(txn.txid, code, msg, failed))
        return actions
