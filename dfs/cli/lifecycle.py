"""`dfs node drain|remove ID` wait here until the node holds no replica any more.

The coordinator's re-replication does the moving (dfs/coordinator/rereplicate.py); this polls
its progress from `status`, shows a bar on a terminal, and gives up (exit 1, one line; the
coordinator keeps trying) when rounds keep failing without progress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client import Client

POLL = 0.2
APPEAR_TIMEOUT = 15.0  # the coordinator starts a round at once; this is generous
STUCK_ROUNDS = 3  # rounds without progress (and with failures) before giving up


def _entry(status: dict[str, Any], node_id: int) -> dict[str, Any] | None:
    for entry in (status.get("rereplication") or {}).get("nodes", []):
        if entry["id"] == node_id:
            return entry
    return None


async def wait_evacuated(client: Client, node_id: int, show_progress: bool) -> int:
    """Block until node_id is clean; returns how many replicas were moved off it."""
    most = 0
    best, best_round = None, 0
    deadline = trio.current_time() + APPEAR_TIMEOUT
    bar = _Bar(node_id) if show_progress else None
    try:
        while True:
            status = await client.status()
            entry = _entry(status, node_id)
            if entry is None:
                if trio.current_time() > deadline:
                    raise DfsError(Code.UNAVAILABLE,
                                   "the coordinator does not report moving its replicas")
            else:
                remaining = int(entry["remaining"])
                most = max(most, remaining, int(entry.get("found", 0)))
                if bar is not None:
                    bar.update(most - remaining, most)
                if entry["clean"]:
                    return most
                if best is None or remaining < best:
                    best, best_round = remaining, int(entry["rounds"])
                elif int(entry["rounds"]) - best_round >= STUCK_ROUNDS and entry["failed"]:
                    error = (status.get("rereplication") or {}).get("last_error") or "?"
                    raise DfsError(Code.UNAVAILABLE,
                                   f"{remaining} replicas cannot be moved now ({error}); "
                                   "the coordinator keeps trying")
            await trio.sleep(POLL)
    finally:
        if bar is not None:
            bar.close()


class _Bar:
    """A rich bar on stderr when it is a terminal, else nothing."""

    def __init__(self, node_id: int) -> None:
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from dfs.cli.common import console

        self.progress: Any = None
        if not sys.stderr.isatty():
            return
        self.progress = Progress(TextColumn(f"moving replicas off node {node_id}"), BarColumn(),
                                 MofNCompleteColumn(), console=console(stderr=True),
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task("", total=None)

    def update(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total or None)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def describe_rereplication(status: dict[str, Any]) -> str | None:
    """One line for `dfs status`: replicas being moved, nodes waiting for it, or moved off."""
    rr = status.get("rereplication") or {}
    nodes = [n for n in rr.get("nodes", []) if not (n.get("clean") and n["reason"] == "removed")]
    if not rr.get("active") and not nodes:
        return None
    if rr.get("active"):
        head = (f"re-replication: {rr.get('done', 0)}/{rr.get('total', 0)} files "
                f"({rr.get('files_per_s', 0)} files/s)")
    elif any(not n.get("clean") for n in nodes):
        head = "re-replication: waiting to retry"
    else:
        head = "re-replication: idle"
        if rr.get("rounds"):
            head += (f" (last round {rr.get('done', 0)} files in {rr.get('elapsed_s', 0)} s, "
                     f"{rr.get('files_per_s', 0)} files/s)")
    parts = [head]
    for n in nodes:
        state = "all replicas moved" if n.get("clean") else f"{n['remaining']} replicas left"
        parts.append(f"node {n['id']} ({n['reason']}): {state}")
    if rr.get("failed"):
        parts.append(f"{rr['failed']} failed: {rr.get('last_error', '')}")
    return "; ".join(parts)
