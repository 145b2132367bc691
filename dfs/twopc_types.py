"""The 2PC machine's vocabulary (dfs.twopc): its phases, the actions it returns to a driver,
and the entry it keeps per transaction. Drivers import them from `dfs.twopc`."""

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
class WriteGroupDecision:
    """Force, in ONE transaction, the COMMITTED records of every member of group `group` and
    every member's inode switch (and the group's namespace operations): all of them or none.

    The driver reports back `group_decision_written` or `group_decision_refused`."""

    group: int
    members: tuple[int, ...]


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


Action = (SendPrepare | SendCommit | SendAbort | WriteDecision | WriteGroupDecision | WriteEnd
          | WriteRepairDecision | MarkBad | ReplyOk | ReplyError)


# ------------------------------------------------------------------ state


@dataclass
class Entry:
    """One transaction the machine keeps: a write from BEGIN, or a decision (a write's or a
    repair's) until every replica it lists acked."""

    txid: int
    replicas: tuple[int, ...]
    phase: Phase = Phase.STAGING
    yes: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)  # owed, but COMMIT is not re-sent (MarkBad)
    group: int = 0  # the multi-file transaction this write is a member of (0: none)

    def check(self) -> None:
        """What must hold after every transition: votes (until the decision: it may drop a
        removed node after), acks and refusals come from listed replicas only, and no replica
        both acked and refused."""
        listed = set(self.replicas)
        assert self.phase not in (Phase.STAGING, Phase.PREPARING) or self.yes <= listed, \
            f"txid {self.txid}: votes {self.yes} beyond {listed}"
        assert self.acked <= listed, f"txid {self.txid}: acks {self.acked} beyond {listed}"
        assert self.refused <= listed, f"txid {self.txid}: refusals beyond {listed}"
        assert not self.acked & self.refused, f"txid {self.txid}: acked and refused"


@dataclass(frozen=True)
class MemberCommit:
    """One member write of a multi-file commit: what `request_commit` takes for one file."""

    txid: int
    size: int
    checksum: bytes
    nchunks: int
    voted: tuple[int, ...] = ()
