"""The multi-file events of the 2PC machine (`dfs.twopc.CommitProtocol` mixes them in).

A group is one transaction over several files (docs/design.md §5, "Several files"). Each
member is an ordinary write entry of the machine (its own txid = its blob id, staged and
prepared on its own replicas); the group ties their fates together:

    request_group_commit ──> every member PREPARING ──every member all YES──> DECIDING
              │                     │ any NO / timeout / refusal                │
              └── a member unknown ─┴──> every member gone (SendAbort to all)   │
                                                       group_decision_written   v
                                          every member COMMITTING (then per member, as today)

One decision (`WriteGroupDecision`) switches every member, or none: the driver forces every
member's COMMITTED record and inode switch (and the group's namespace operations) in one
LMDB write. After it each member is an ordinary decided write: COMMIT delivered to its
replicas, ENDED when they all acked, recovered from its record after a restart. Before it, a
crash forgets the whole group: presumed abort, for every member at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dfs.errors import Code
from dfs.twopc_types import (
    Action,
    Entry,
    MemberCommit,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendPrepare,
    WriteGroupDecision,
)


@dataclass
class Group:
    gid: int
    members: tuple[int, ...]
    phase: Phase = Phase.PREPARING


class GroupEvents:
    """The multi-file half of CommitProtocol: its state is `_groups`, next to `_txns`."""

    _txns: dict[int, Entry]
    _groups: dict[int, Group]

    if TYPE_CHECKING:  # the machine's, in dfs.twopc
        def _abort(self, txn: Entry, code: Code, msg: str, failed: tuple[int, ...],
                   *, reply: bool = True) -> list[Action]: ...
        def _committing(self, txn: Entry) -> list[Action]: ...

    # -------------------------------------------------------------- queries

    def group_phase(self, gid: int) -> Phase | None:
        group = self._groups.get(gid)
        return group.phase if group else None

    def group_of(self, txid: int) -> int:
        txn = self._txns.get(txid)
        return txn.group if txn else 0

    # -------------------------------------------------------------- events

    def request_group_commit(self, gid: int, members: Sequence[MemberCommit]) -> list[Action]:
        """The client staged every member and asks for one decision over all of them. `gid`
        is a fresh id (not a member's). A member that is unknown, already committing or in
        another group aborts every member: the group commits whole or not at all."""
        if gid in self._groups or gid in self._txns:
            return []  # a duplicate request: the first one's reply answers it
        txids = tuple(m.txid for m in members)
        bad = [t for t in txids if t not in self._txns
               or self._txns[t].phase is not Phase.STAGING or self._txns[t].group]
        if bad or len(set(txids)) != len(txids):
            actions: list[Action] = []
            for t in dict.fromkeys(txids):
                txn = self._txns.get(t)
                if t not in bad and txn is not None and txn.phase is Phase.STAGING:
                    actions += self._abort(txn, Code.UNAVAILABLE, "", (), reply=False)
            what = f"transaction {bad[0]} is unknown or aborted" if bad \
                else "a transaction is named twice"
            return [*actions, ReplyError(gid, Code.UNAVAILABLE, what)]
        group = Group(gid, txids)
        self._groups[gid] = group
        prepares: list[Action] = []
        for m in members:
            txn = self._txns[m.txid]
            txn.group = gid
            txn.phase = Phase.PREPARING
            txn.yes.update(n for n in m.voted if n in txn.replicas)
            prepares += [SendPrepare(n, m.txid, m.size, m.checksum, m.nchunks)
                         for n in txn.replicas if n not in txn.yes]
        return self._group_maybe_decide(group) or prepares

    def group_decision_written(self, gid: int) -> list[Action]:
        """The commit point of every member has passed, at once."""
        group = self._groups.pop(gid)
        assert group.phase is Phase.DECIDING
        assert all(self._txns[t].phase is Phase.DECIDING for t in group.members), \
            f"group {gid}: a member decided apart from it"
        actions: list[Action] = [ReplyOk(gid)]
        for t in group.members:
            actions += self._committing(self._txns[t])
        return actions

    def group_decision_refused(self, gid: int, code: Code, msg: str) -> list[Action]:
        group = self._groups[gid]
        assert group.phase is Phase.DECIDING
        return self._group_abort(group, code, msg, ())

    # -------------------------------------------------------------- the machine's hooks

    def _member_voted(self, txn: Entry, node: int, yes: bool, code: Code, msg: str
                      ) -> list[Action]:
        """A vote on a member: one NO aborts the group; the last YES decides it."""
        group = self._groups[txn.group]
        if not yes:
            return self._group_abort(group, code, f"replica {node} voted no on transaction "
                                                  f"{txn.txid}: {msg or code.value}", (node,))
        txn.yes.add(node)
        return self._group_maybe_decide(group)

    def _member_timed_out(self, txn: Entry) -> list[Action]:
        missing = tuple(n for n in txn.replicas if n not in txn.yes)
        return self._group_abort(self._groups[txn.group], Code.UNAVAILABLE,
                                 f"no vote from replicas {list(missing)} on transaction "
                                 f"{txn.txid}", missing)

    # -------------------------------------------------------------- helpers

    def _group_maybe_decide(self, group: Group) -> list[Action]:
        members = [self._txns[t] for t in group.members]
        assert all(m.phase is group.phase and m.group == group.gid for m in members), \
            f"group {group.gid}: members out of its phase {group.phase}"
        if group.phase is not Phase.PREPARING or any(len(m.yes) < len(m.replicas)
                                                     for m in members):
            return []
        group.phase = Phase.DECIDING
        for m in members:
            m.phase = Phase.DECIDING
        return [WriteGroupDecision(group.gid, group.members)]

    def _group_abort(self, group: Group, code: Code, msg: str, failed: tuple[int, ...]
                     ) -> list[Action]:
        del self._groups[group.gid]
        actions: list[Action] = []
        for t in group.members:
            txn = self._txns.get(t)
            if txn is not None:
                actions += [a for a in self._abort(txn, code, msg, failed, reply=False)
                            if isinstance(a, SendAbort)]
        return [*actions, ReplyError(group.gid, code, msg, failed)]
