"""Which mount writes that did not finish may still have committed (issue 17).

A program writing through the mount learns an errno only. The mount answers EIO both for a
commit that certainly failed (every attempt of it was aborted: "write of inode N failed after
K attempts") and for one whose outcome it could not learn (the reply was lost and the
coordinator could no longer tell, or the outcome query was cut off), and the program gets
ENOTCONN when the mount dies under its close. Only the last two may have committed. The
writers' mount says which it was: it logs each failed commit with its error (`commit of inode
N failed, it keeps its previous version: ERROR`) and each commit it tries again (`write_file
failed (ERROR); retrying`, which names no inode when the outcome was unknown); the nemesis
records when it killed or stopped that mount; and a writer cut short by its deadline (or the
campaign's end) may have been inside its close.

So an `info` mount write (its program failed after its open may have succeeded) may have
committed only if, while it ran (SLACK either side, for the log's clock), the writers' mount
logged an error that does not say the commit certainly failed (a failed commit of the write's
inode, or any retry), or was killed or stopped, or the write was cut short. Every other one
certainly did not commit: `classify` makes its op `fail`, and then nothing of it may show.

Not every program reports its close: bash ignores the error of the close that ends a
redirect of a builtin (`echo x > f` exits 0 when that close, the commit, failed). So first an
`ok` write of a known inode whose commit the mount logged as failed while it ran becomes
`info`: it did not finish, whatever its exit status said; so does such a program's `ok` write
while the mount was killed or stopped, which may have logged nothing (CI, nemesis seed 17:
`echo` exited 0 as its mount was killed under the close). (Not the fork loop's writes: they
are timed by their whole round, and Python and cp report their closes.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dfs.errors import Code, DfsError
from dfs.nemesis.history import FAIL, FOREIGN_IDS, INFO, OK, History, Op, classify

SLACK = 2.0  # seconds each side of a write: a log line's time is the wall clock's, to the ms
CLOCK = 0.01  # how far a log line's time may be off the history's (both are read together)
FAILED = re.compile(r"commit of inode (\d+) failed, it keeps its previous version: (.*)$")
RETRIED = re.compile(r"write_file failed \((.*)\); retrying in ")
TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MOUNT_DOWN = frozenset({"kill-mount", "stop-mount"})
UNREPORTED = "its program exited 0, but the mount's commit of it failed"


def certain(error: str) -> bool:
    """Whether a logged commit error (`CODE: message`) says the commit certainly failed."""
    code, _, msg = error.partition(": ")
    try:
        return classify(DfsError(Code(code), msg)) == FAIL
    except ValueError:
        return False  # not a DfsError (a lost connection, a timeout): unknown


@dataclass
class MountEnds:
    """What the writers' mount said and suffered, on the history's clock: `read` it once the
    load has stopped, then `classify` the mount writes by it."""

    #: (history time, inode or None for a retry) of each error that leaves an outcome unknown
    unknown: list[tuple[float, int | None]] = field(default_factory=list)
    failed: list[tuple[float, int, str]] = field(default_factory=list)  # every failed commit
    down: list[tuple[float, float]] = field(default_factory=list)  # killed or stopped

    @property
    def retries(self) -> int:
        """Commits the mount tried again after an error that left their outcome unknown:
        each may have committed the same bytes twice."""
        return sum(1 for _, ino in self.unknown if ino is None)

    @classmethod
    def read(cls, log: Path, history: History) -> MountEnds:
        ends = cls(down=[(f["time"], f.get("stop", math.inf)) for f in history.faults
                         if f["kind"] in MOUNT_DOWN])
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            stamp = TIME.match(line)
            failed, retried = FAILED.search(line), RETRIED.search(line)
            error = failed.group(2) if failed else retried.group(1) if retried else None
            if stamp is None or error is None:
                continue
            wall = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            t, ino = wall - history.wall_start, int(failed.group(1)) if failed else None
            if ino is not None:
                ends.failed.append((t, ino, error))
            if not certain(error):
                ends.unknown.append((t, ino))
        return ends

    def unreported(self, op: Op, ino: int | None) -> str | None:
        """The error of a commit of `ino` that failed while `op` ran (strictly: its previous
        writer's is logged before this one began), if its program did not say so."""
        if ino is None or op.complete is None or op.id >= FOREIGN_IDS:
            return None
        return next((error for t, at, error in self.failed
                     if at == ino and op.invoke + CLOCK < t < op.complete), None)

    def may_have_committed(self, op: Op, ino: int | None) -> bool:
        """Whether an unfinished write may have committed (see above); `ino`: its file's
        inode, None when each write makes a new one (tar, rsync)."""
        if op.cut:
            return True
        start, end = self._span(op)
        return self.down_under(op) or any(
            start <= t <= end and (at is None or ino is None or at == ino)
            for t, at in self.unknown)

    def down_under(self, op: Op) -> bool:
        """Whether the writers' mount was killed or stopped while `op` ran."""
        start, end = self._span(op)
        return any(a <= end and b >= start for a, b in self.down)

    @staticmethod
    def _span(op: Op) -> tuple[float, float]:
        return op.invoke - SLACK, (math.inf if op.complete is None else op.complete) + SLACK

    def classify(self, history: History, vias: frozenset[str], inos: dict[str, int | None],
               after_close: frozenset[str] = frozenset(),
               close_unreported: frozenset[str] = frozenset()) -> int:
        """Every `ok` write `via` the writers' mount whose close failed unreported becomes
        `info`; then every `info` one that cannot have committed becomes `fail` (both noted
        in the history), but for the programs named in `after_close`, whose failure may come
        after their close committed (tar failing to set an owner). A program named in
        `close_unreported` exits 0 whatever its close did, and a mount killed under that close
        logs nothing: its `ok` write while the mount was down is `info` too. How many became
        `fail`."""
        settled = 0
        for op in history.ops.values():
            if op.process in after_close:
                continue
            error = self.unreported(op, inos.get(op.file)) if op.outcome == OK else None
            if error is None and op.outcome == OK and op.process in close_unreported \
                    and self.down_under(op):
                error = "the mount was killed or stopped under it"
            if op.f == "write" and op.via in vias and error is not None:
                op.outcome = INFO
                op.error = f"{UNREPORTED}: {error}"
                history.note("mount write not finished: its close failed", op=op.id)
            if op.f == "write" and op.via in vias and op.outcome == INFO \
                    and not self.may_have_committed(op, inos.get(op.file)):
                op.outcome = FAIL
                op.error = f"{op.error}; certainly not committed (docs/nemesis.md)"
                history.note("mount write certainly not committed", op=op.id)
                settled += 1
        return settled
