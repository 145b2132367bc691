"""Planted bugs: the real classes with one rule broken, swapped in for the length of a run.

What tests/test_simulation.py proves with them is that the simulator catches each bug in the
code that runs (the real coordinator, node, machine and database), not in a model of it:
- refused_commit_acked: a replica's refused COMMIT counts as its ack (rule 5 broken), so the
  decision ends while that replica holds no committed copy;
- outcome_forgets_repairs: OUTCOME consults only the log and the writes in flight, as it once
  did, so a repair target whose blob's record was purged hears "aborted" and drops its copy;
- vote_before_force: a node votes YES with PREPARED written but not forced (rule 2 broken);
- commit_ack_before_force: a node acks a (batched) COMMIT with COMMITTED written but not
  forced (rule 5 broken: "a participant forces COMMITTED before it acks");
- vote_in_stage_before_force: the same, only in the reply to a STAGE carrying the prepare
  fields (a one-chunk write's one message), PREPARE itself kept right;
- decision_visible_unforced: a durable batch is readable before its fsync (issue 8 item 5);
- group_decision_split: a multi-file commit's decision is one LMDB write per operation, not
  one for all (each forced, a crash point between them), so a reader or a crash sees a mix.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from dfs import runtime
from dfs.coordinator.commit import CommitDriver
from dfs.coordinator.group_commit import GroupCommit, OpenGroup
from dfs.db import Database
from dfs.failpoints import failpoint
from dfs.sim.world import Faults
from dfs.twopc import CommitProtocol, Phase
from storage_node.store import BlobStore


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _refused_commit_acked() -> contextlib.AbstractContextManager[None]:
    def commit_refused(self: CommitProtocol, txid: int, node: int, code: Any,
                       msg: str = "") -> list[Any]:
        return CommitProtocol.commit_acked(self, txid, node)

    return _patched(CommitProtocol, "commit_refused", commit_refused)


def _outcome_forgets_repairs() -> contextlib.AbstractContextManager[None]:
    def outcome(self: CommitDriver, txid: int, *, writer: bool = False) -> str:
        if self.store.db.read(lambda t: self.store.txnlog.get(t, txid)) is not None:
            return "committed"
        if self.protocol.phase(txid) in (Phase.STAGING, Phase.PREPARING, Phase.DECIDING):
            return "inflight"
        return "aborted"

    return _patched(CommitDriver, "outcome", outcome)


_in_prepare: contextvars.ContextVar[bool] = contextvars.ContextVar("in_prepare", default=False)


def _unforced(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` with every write it makes left unforced (see _vote_before_force)."""

    async def unforced(self: BlobStore, *args: Any, **kwargs: Any) -> Any:
        token = _in_prepare.set(True)
        try:
            return await method(self, *args, **kwargs)
        finally:
            _in_prepare.reset(token)

    return unforced


@contextlib.contextmanager
def _vote_before_force(methods: tuple[str, ...] = ("prepare", "stage_prepared")
                       ) -> Iterator[None]:
    """The store's verify-and-force of `methods` writes PREPARED without forcing it, and the
    node votes YES all the same: by PREPARE, or in the reply to a STAGE carrying the prepare
    fields (`stage_prepared`)."""
    write = BlobStore._write

    async def unforced_write(self: BlobStore, fn: Callable[..., Any], *, durable: bool,
                             need: int = 0) -> Any:
        return await write(self, fn, durable=durable and not _in_prepare.get(), need=need)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(BlobStore, "_write", unforced_write))
        for name in methods:
            stack.enter_context(_patched(BlobStore, name, _unforced(getattr(BlobStore, name))))
        yield


_in_commit: contextvars.ContextVar[bool] = contextvars.ContextVar("in_commit", default=False)


@contextlib.contextmanager
def _commit_ack_before_force() -> Iterator[None]:
    write, commit_many = BlobStore._write, BlobStore.commit_many

    async def unforced_write(self: BlobStore, fn: Callable[..., Any], *, durable: bool,
                             need: int = 0) -> Any:
        return await write(self, fn, durable=durable and not _in_commit.get(), need=need)

    async def unforced_commit(self: BlobStore, *args: Any, **kwargs: Any) -> Any:
        token = _in_commit.set(True)
        try:
            return await commit_many(self, *args, **kwargs)
        finally:
            _in_commit.reset(token)

    with _patched(BlobStore, "_write", unforced_write), \
            _patched(BlobStore, "commit_many", unforced_commit):
        yield


def _decision_visible_unforced() -> contextlib.AbstractContextManager[None]:
    return _patched(Database, "hide_unforced", False)


def _group_decision_split() -> contextlib.AbstractContextManager[None]:
    async def force(self: CommitDriver, group: OpenGroup) -> list[Any]:
        attrs: list[Any] = []
        for op in group.ops:
            await failpoint("coordinator.before_decision")
            one = replace(group, ops=[op])
            now = runtime.wall_ns()
            attrs += await self.store.db.write(lambda t, one=one, now=now: self._write_group(
                t, one, now))
        return attrs

    return _patched(GroupCommit, "_force_group_decision", force)


_BUGS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "refused_commit_acked": _refused_commit_acked,
    "outcome_forgets_repairs": _outcome_forgets_repairs,
    "vote_before_force": _vote_before_force,
    "commit_ack_before_force": _commit_ack_before_force,
    "vote_in_stage_before_force": lambda: _vote_before_force(("stage_prepared",)),
    "decision_visible_unforced": _decision_visible_unforced,
    "group_decision_split": _group_decision_split,
}

BUGS: tuple[str, ...] = tuple(_BUGS)

# Faults that exercise the broken rule's path often enough to catch it: a refused COMMIT
# needs a node that cannot commit, and a full disk is the common way a real one cannot.
FAULTS: dict[str, Faults] = {
    "refused_commit_acked": replace(Faults(), disk_full_rate=0.15, disk_full_for=(1.0, 5.0)),
}


def faults_for(bug: str | None) -> Faults | None:
    """The fault profile a run with `bug` planted uses (None: the default)."""
    return FAULTS.get(bug) if bug else None


@contextlib.contextmanager
def planted(bug: str | None) -> Iterator[None]:
    if bug is None:
        yield
        return
    if bug not in _BUGS:
        raise ValueError(f"unknown planted bug {bug!r} (known: {', '.join(BUGS)})")
    with _BUGS[bug]():
        yield
