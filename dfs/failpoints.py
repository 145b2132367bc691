"""Failpoints (docs/design.md §8): named places where tests make a process crash, fail or stall.

DFS_FAILPOINTS="name=crash|error|delay:MS,..." arms them at import. With none armed a
failpoint costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio

from dfs.errors import Code, DfsError

log = logging.getLogger(__name__)

NAMES = frozenset(
    {
        "coordinator.before_prepare",
        "coordinator.before_decision",
        "coordinator.after_decision",
        "coordinator.mid_commit",
        "node.after_stage",
        "node.before_vote",
        "node.before_commit_ack",
    }
)

# The repair transaction's steps (docs/checker.md); not part of the 2PC crash matrix above.
REPAIR_NAMES = frozenset(
    {
        "repair.after_fetch",
        "repair.before_decision",
        "repair.after_decision",
    }
)

# A snapshot has written a piece of its copy, not yet the last (dfs/coordinator/snapshot_ops.py);
# an elected coordinator is about to load its cache from etcd (dfs/coordinator/ha.py).
SNAPSHOT_NAMES = frozenset({"snapshot.after_piece", "coordinator.takeover"})

# A durable batch committed, not yet flushed: in the simulator a crash here is a power cut
# that loses the batch, so whatever was observable of it before the flush is caught.
STORAGE_NAMES = frozenset({"db.before_flush"})

# A storage node's online compaction (storage_node/compaction.py): after the copy, with the
# forced copy not yet renamed over data.mdb, and right after the switch (writes still paused).
COMPACT_NAMES = frozenset(
    {"node.compact_after_copy", "node.compact_before_swap", "node.compact_after_swap"})

_armed: dict[str, str] = {}
# The simulator's hook (dfs/sim): called at every failpoint, armed or not, to crash the
# simulated process right there. None in production, where a failpoint is one dict lookup.
_hook: Callable[[str], Awaitable[None]] | None = None


def install_hook(hook: Callable[[str], Awaitable[None]] | None) -> None:
    global _hook
    _hook = hook


def arm(spec: str) -> None:
    """Parse a DFS_FAILPOINTS value and arm what it names (replacing what was armed)."""
    _armed.clear()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in NAMES | REPAIR_NAMES | STORAGE_NAMES | SNAPSHOT_NAMES | COMPACT_NAMES:
            raise ValueError(f"unknown failpoint {name!r}")
        if action not in ("crash", "error") and not action.startswith("delay:"):
            raise ValueError(f"bad failpoint action {action!r} for {name}")
        _armed[name] = action


def can_fire(name: str) -> bool:
    """Whether `failpoint(name)` may do anything (armed, or the simulator's hook is in):
    callers that would otherwise split work around it may keep it whole."""
    return _hook is not None or name in _armed


async def failpoint(name: str) -> None:
    if _hook is not None:
        await _hook(name)
    action = _armed.get(name)
    if action is None:
        return
    log.warning("failpoint %s fires: %s", name, action)
    if action == "crash":
        os._exit(137)
    if action == "error":
        raise DfsError(Code.INTERNAL, f"failpoint {name}")
    await trio.sleep(int(action.split(":", 1)[1]) / 1000)


arm(os.environ.get("DFS_FAILPOINTS", ""))
