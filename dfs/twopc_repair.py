"""The repair events of the 2PC machine (`dfs.twopc.CommitProtocol` mixes them in).

A repair is a transaction of the same machine, keyed by the blob id (the txid of the write that
made it), which keeps content and version and changes only where the copies live:

    begin_repair ──> PREPARING ──repair_prepared──> DECIDING ──repair_decision_written──> merged
                         │ no target ok               │ refused                     into COMMITTING
                         └──> (gone: SendAbort) <─────┘

The driver fetches and PREPAREs the targets itself (node to node), then reports. While the
repair is undecided its blob is in flight; its decision is written only while the blob's own
entry (the file's write, or an earlier repair) is not ENDING, and that entry does not start
ENDING while a repair decision is being written (`_repair_deciding`, which the machine's end
rule asks), so the log's writes of the two never cross. The decision merges the targets into
the COMMITTING entry: they owe a (new) ack, replicas the repair dropped owe nothing any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dfs.twopc_types import (
    Action,
    Entry,
    Phase,
    SendAbort,
    SendCommit,
    WriteRepairDecision,
)


@dataclass
class Repair:
    blob: int
    targets: tuple[int, ...]
    new: frozenset[int]  # targets not listed now: their copies are aborted if they fail
    phase: Phase = Phase.PREPARING
    ok: tuple[int, ...] = ()
    prepared: tuple[int, ...] = ()  # copies this repair PREPAREd (aborted if it is refused)
    waiting: bool = False  # decided, held back while the blob's entry is ENDING


class RepairEvents:
    """The repairs half of CommitProtocol: its state is `_repairs`, next to the machine's
    `_txns`; the end of an entry stays the machine's one rule (`_maybe_end`)."""

    _txns: dict[int, Entry]
    _repairs: dict[int, Repair]

    if TYPE_CHECKING:  # the machine's, in dfs.twopc
        def phase(self, txid: int) -> Phase | None: ...
        def _maybe_end(self, txn: Entry) -> list[Action]: ...

    # -------------------------------------------------------------- queries

    def repair_phase(self, txid: int) -> Phase | None:
        repair = self._repairs.get(txid)
        return repair.phase if repair else None

    def _repairing(self, blob: int) -> bool:
        """A repair of blob is undecided: the blob is in flight for OUTCOME."""
        return blob in self._repairs

    def _repair_deciding(self, blob: int) -> bool:
        """A repair decision of blob is due or being written (it may list more replicas):
        the blob's entry must not end meanwhile."""
        repair = self._repairs.get(blob)
        return repair is not None and repair.phase is Phase.DECIDING

    def _repair_after_end(self, blob: int) -> list[Action]:
        """The blob's entry has ended: a decision held back for it may be written now."""
        repair = self._repairs.get(blob)
        if repair is not None and repair.waiting:
            repair.waiting = False
            return [WriteRepairDecision(blob, repair.ok)]
        return []

    # -------------------------------------------------------------- events

    def begin_repair(self, blob: int, targets: list[int] | tuple[int, ...],
                     new: list[int] | tuple[int, ...] = ()) -> list[Action]:
        """A repair of `blob` starts copying to `targets` (`new`: those not listed now)."""
        if blob in self._repairs:
            raise ValueError(f"blob {blob} is being repaired already")
        if self.phase(blob) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING):
            raise ValueError(f"blob {blob} is an undecided write, not a file's blob")
        self._repairs[blob] = Repair(blob, tuple(targets), frozenset(new))
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
            repair.waiting = True  # end_written hands it on (_repair_after_end)
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
            txn = self._txns[blob] = Entry(blob, repair.ok, Phase.COMMITTING)
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
