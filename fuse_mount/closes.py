"""Which close of a file ends its writer's write (docs/design.md §7, "Which close commits").

The kernel sends FLUSH at every close() of every descriptor of an open file: the original,
each dup, each copy a forked child inherited and closes (at exec for O_CLOEXEC ones, or at
exit), and the descriptors the kernel closes for a process killed by a signal. Only one of
those closes is the end its writer meant, and FLUSH does not say which (pyfuse3 gives FLUSH
no request context, and FUSE never says how many references remain). So the mount asks the
one process the handle belongs to, the one that opened it, through /proc:

- killed: the opener, or a child of it that held the file at an earlier close, is dying or
  dead by a signal (its exit code, /proc/PID/stat field 52, names the signal; the kernel sets
  it before it closes a dying process's files, and the dying process waits for our FLUSH
  reply). A write whose writer was killed is the case rollback exists for: nothing commits.
- held: the opener still has a descriptor open for writing on the file that its other
  writable handles here do not account for (a dup, as a shell's `cmd > f` holds fd 1 after closing the original), or a
  child of it still has one (a forked child, which may be writing): not the end yet.
- otherwise this close is the writer's end: commit, and close() returns the commit's result.

What /proc cannot settle (the opener is gone, too many descriptors to read, no permission to
read them) is WAIT: the handle commits at RELEASE, when the last reference to the open file
is gone and nothing can write through it any more, unless a close was judged KILLED first.
The rule, as data: `RULES`, first match wins.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuse_mount.daemon import mount_device

log = logging.getLogger(__name__)

#: Descriptors of one process read before the judge gives up on it (WAIT): reading each is a
#: small /proc read, and a close must stay cheap.
MAX_FDS_READ = 4096
#: Children of the opener whose descriptors are read (a forking server may have thousands).
MAX_CHILDREN_READ = 256
#: PF_EXITING in /proc/PID/stat's flags: the task is in do_exit.
PF_EXITING = 0x4


class Verdict(enum.Enum):
    COMMIT = "commit"  # this close is the writer's end
    WAIT = "wait"  # not the end, or unknown: RELEASE commits unless a close is judged KILLED
    KILLED = "killed"  # the writer died by a signal: the handle's writes are dropped


@dataclass(frozen=True)
class Process:
    """A process at one moment, as /proc shows it."""

    pid: int
    start: int  # starttime (field 22): a pid reused by another process has another
    exiting: bool
    signal: int  # the signal that ends it, 0 if it runs or exits by itself


@dataclass
class Writer:
    """Who a writable handle belongs to: the opener's process (thread group), and the
    children seen holding the file at an earlier close."""

    pid: int
    start: int
    holders: set[tuple[int, int]] = field(default_factory=set)
    killed_by: int = 0  # set once a close found the writer killed


@dataclass(frozen=True)
class Facts:
    """What one close is judged by."""

    opener: Process | None  # None: gone (reaped, or its pid reused)
    extra_fds: int | None  # the opener's descriptors on the file beyond its other handles
    child_holders: frozenset[tuple[int, int]] | None  # None: could not be read
    killed_holder: int  # signal of a remembered holder now killed, else 0


def _killed(f: Facts) -> bool:
    return (f.opener is not None and f.opener.signal != 0) or f.killed_holder != 0


#: The rule, first match wins.
RULES: list[tuple[str, Callable[[Facts], bool], Verdict]] = [
    ("the opener or a holding child was killed by a signal", _killed, Verdict.KILLED),
    ("the opener is gone: only RELEASE knows the last close", lambda f: f.opener is None,
     Verdict.WAIT),
    ("/proc could not be read", lambda f: f.extra_fds is None or f.child_holders is None,
     Verdict.WAIT),
    ("the opener holds another descriptor on it", lambda f: bool(f.extra_fds), Verdict.WAIT),
    ("a child of the opener holds it", lambda f: bool(f.child_holders), Verdict.WAIT),
    ("this close is the writer's end", lambda f: True, Verdict.COMMIT),
]


def judge(facts: Facts) -> tuple[Verdict, str]:
    for why, applies, verdict in RULES:
        if applies(facts):
            return verdict, why
    raise AssertionError("RULES ends with a rule that always applies")


def _signal_of(exit_code: int) -> int:
    """The signal in a wait(2) status, 0 for a normal exit."""
    sig = exit_code & 0x7F
    return 0 if sig == 0x7F else sig  # 0x7f: stopped, not a death


class ProcReader:
    """The facts of a close, read from /proc. The mount's MAJ:MIN (the mount table's third
    field, read once, at the first close judged) tells this mount's files from others with
    the same inode number; without a mountpoint every close is WAIT."""

    def __init__(self, mountpoint: Path | None, root: Path = Path("/proc")) -> None:
        self.mountpoint = mountpoint
        self.root = root
        self._device: str | None = None

    @property
    def device(self) -> str | None:
        if self._device is None and self.mountpoint is not None:
            self._device = mount_device(self.mountpoint)
        return self._device

    def writer(self, tid: int) -> Writer | None:
        """The thread group of the task that opened a handle (FUSE names a thread)."""
        try:
            status = (self.root / str(tid) / "status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("Tgid:"):
                pid = int(line.split()[1])
                process = self.process(pid)
                return None if process is None else Writer(pid, process.start)
        return None

    def process(self, pid: int) -> Process | None:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()  # after "(comm) ": field 3 onwards
        state, flags, start = fields[0], int(fields[6]), int(fields[19])
        exit_code = int(fields[49]) if len(fields) > 49 else 0
        exiting = bool(flags & PF_EXITING) or state in ("Z", "X", "x")
        return Process(pid, start, exiting, _signal_of(exit_code) if exiting else 0)

    def alive(self, pid: int, start: int) -> Process | None:
        process = self.process(pid)
        return process if process is not None and process.start == start else None

    def _mount_ids(self, pid: int) -> set[str] | None:
        """This mount's ids in pid's mount namespace (a bind mount or another namespace has
        other ids for the same file system)."""
        if self.device is None:
            return None
        try:
            lines = (self.root / str(pid) / "mountinfo").read_text().splitlines()
        except OSError:
            return None
        return {f[0] for f in (line.split() for line in lines) if len(f) > 2 and
                f[2] == self.device}

    def fds_on(self, pid: int, ino: int) -> int | None:
        """How many of pid's descriptors open for writing are on this mount's inode `ino`
        (a read-only one is never a writable handle's); None if unknown."""
        fdinfo = self.root / str(pid) / "fdinfo"
        try:
            names = os.listdir(fdinfo)
        except FileNotFoundError:
            return 0  # gone
        except OSError:
            return None
        if not names:
            return 0  # exiting: its descriptor table is closed (so may its namespaces be)
        if len(names) > MAX_FDS_READ:
            return None
        ids = self._mount_ids(pid)
        if ids is None:
            return None
        count = 0
        for name in names:
            try:
                text = (fdinfo / name).read_text()
            except FileNotFoundError:
                continue  # closed meanwhile
            except OSError:
                return None
            mnt = node = None
            flags = 0
            for line in text.splitlines():
                if line.startswith("mnt_id:"):
                    mnt = line.split()[1]
                elif line.startswith("ino:"):
                    node = int(line.split()[1])
                elif line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
            if mnt in ids and node == ino and flags & os.O_ACCMODE != os.O_RDONLY:
                count += 1
        return count

    def children(self, pid: int) -> list[int] | None:
        try:
            tasks = os.listdir(self.root / str(pid) / "task")
        except FileNotFoundError:
            return []
        except OSError:
            return None
        out: list[int] = []
        for tid in tasks:
            try:
                out.extend(int(c) for c in
                           (self.root / str(pid) / "task" / tid / "children").read_text().split())
            except FileNotFoundError:
                continue
            except OSError:
                return None
        return out

    def facts(self, writer: Writer, ino: int, own_handles: int) -> Facts:
        """`own_handles`: the opener's other writable handles on ino here (each holds a
        descriptor open for writing).
        Refreshes `writer.holders` to the children holding the file now."""
        opener = self.alive(writer.pid, writer.start)
        killed_holder = 0
        for pid, start in writer.holders:
            holder = self.alive(pid, start)
            if holder is not None and holder.signal:
                killed_holder = holder.signal  # held it at our last look, killed since
        if opener is None or opener.signal:
            return Facts(opener, None, None, killed_holder)
        fds = self.fds_on(writer.pid, ino)
        extra = None if fds is None else max(0, fds - own_handles)
        holders = self._holding_children(writer.pid, ino)
        writer.holders = set() if holders is None else set(holders)
        return Facts(opener, extra, holders, killed_holder)

    def _holding_children(self, pid: int, ino: int) -> frozenset[tuple[int, int]] | None:
        kids = self.children(pid)
        if kids is None or len(kids) > MAX_CHILDREN_READ:
            return None
        holders = set()
        for kid in kids:
            child = self.process(kid)
            if child is None or child.exiting:
                continue  # gone, or exiting: its descriptor table is closed or closing
            held = self.fds_on(kid, ino)
            if held is None:
                return None
            if held:
                holders.add((kid, child.start))
        return frozenset(holders)
