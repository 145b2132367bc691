"""A campaign's writers of every shape on a mount and its readers on another (issue 17), judged
by the versions they leave (finished.py), not by the history checker.

Each shape of mount_writers.py (one big write, small writes, cp, a shell redirect, echo, tar,
rsync, rsync --inplace, dd conv=fsync) and the threaded fork loop rewrite their own files
under /nemesis-shapes through the writers' mount, while a reader on the readers' mount (a
second `dfs mount`, another host as far as the cluster can tell) reads them whole. The
directory keeps every version (`user.dfs.keep_versions`), so each version the writers left
can be listed and judged at the end. A worker owns its shapes, so the writers of one file
take turns and an in-place file's versions must be its finished writes, in order.

A write is `ok` when its program exited 0: the close (or fsync) it meant as its end returned 0,
so it finished and must show exactly once. It is `info` when its program failed or was cut
short by its deadline. At the end mount_ends.py settles both: an `ok` one whose commit the
mount logged as failed becomes `info` (bash ignores that error for `echo x > f`), and an
`info` one is `fail` (nothing of it may show) unless its commit may have been decided, when
its content may show whole, at most once, never before a write finished ahead of it, or never
(docs/nemesis.md, "Writers on the mount"). The nemesis also starts a line writer
(mount_writers.LINES, which never closes) and, mid-write, kills it (kill-writer) or kills or
stops its mount (kill-mount, stop-mount): a `fail` op.

Every program runs in its own session with a deadline; late (or cancelled) its session is
killed by its id, the program's pid, so rsync's and the fork loop's children go with it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import random
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dfs.cli.procs import exit_text
from dfs.client import Client
from dfs.errors import Code, DfsError
from dfs.meta.attrs import KEEP_VERSIONS_XATTR
from dfs.meta.versions import KEEP_VERSIONS_MAX
from dfs.nemesis.checker import Violation
from dfs.nemesis.cluster import MOUNT, READER_MOUNT, NemesisCluster
from dfs.nemesis.finished import Read, Target, judge_file, judge_reads, key, repeated, summary
from dfs.nemesis.history import FAIL, FOREIGN_IDS, HEADER, INFO, OK, History, Op, digest
from dfs.nemesis.mount_ends import UNREPORTED, MountEnds
from dfs.nemesis.mount_writers import SHAPES, ForkLoop, Shape, begun_by, line_writer, make

SHAPES_DIR = "nemesis-shapes"
#: A file's writers stop short of what its directory keeps: a dropped version is unjudged.
WRITES_PER_FILE = KEEP_VERSIONS_MAX - 10
FORK_FILES, FORK_CP = ("fork-a", "fork-b"), "fork-cp"
KILLED_FILE = "killed-writer"  # the line writer kill-writer kills mid-write
STOPPED_FILE = "stopped-mount"  # the line writer mid-write as kill-mount or stop-mount acts
FORK_ROUND = 8.0  # seconds of one fork-loop program; a fresh one each round
FORK_RANGE = 10**6  # op ids one round may number its writes with (from FOREIGN_IDS on)
LINES_WANTED = (1, 15)  # lines the line writer writes before the nemesis acts
LINES_PAUSE = 0.05
LINES_WAIT = 10.0  # at most, for those lines (its mount may be paused)
REAP_TIMEOUT = 60.0
OLD_SIZE = 100
#: Writes are cut to this (2 chunks, ~10 FUSE requests): every version is kept, and read by
#: each deep check, so the bytes kept grow with the campaign's length.
MAX_SIZE = 1_200 * 1024
CUT_SHORT = "cut short by the campaign's end"
WRITE_VIA, READ_VIA = "shapes", "mount-r"
#: Ops judged by the versions they leave (MountLoad.judge), which check_history skips.
JUDGED_BY_VERSIONS = frozenset({WRITE_VIA, READ_VIA})
#: The processes whose failure may come after their close committed (Shape.fails_after_close).
AFTER_CLOSE = frozenset(f"shape-{s.name}" for s in SHAPES if s.fails_after_close)
#: The processes that exit 0 when their close failed (Shape.reports_close).
CLOSE_UNREPORTED = frozenset(f"shape-{s.name}" for s in SHAPES if not s.reports_close)


async def run_program(argv: list[str], stdin: bytes = b"", *, timeout: float,
                      stdout: Path | None = None) -> tuple[int | None, bytes, bytes]:
    """(exit status, stdout, stderr) of a program run in its own session (stdout to a file
    if given); past `timeout` (status None) or when cancelled its session is killed by its
    id."""
    options: dict[str, Any] = {"start_new_session": True, "deliver_cancel": _kill_session,
                               "capture_stderr": True, "check": False}
    with trio.move_on_after(timeout), contextlib.ExitStack() as stack:
        if stdout is None:
            options["capture_stdout"] = True
        else:
            options["stdout"] = stack.enter_context(open(stdout, "wb"))  # noqa: SIM115
        done = await trio.run_process(argv, stdin=stdin, **options)
        return done.returncode, done.stdout or b"", done.stderr
    return None, b"", b""


async def _kill_session(process: trio.Process) -> None:
    """SIGKILL to the session the program leads (its id is the program's pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def reap(process: trio.Process) -> None:
    """Kill a program's session and wait for it (bounded; shielded, so it is never left)."""
    with trio.CancelScope(shield=True), trio.move_on_after(REAP_TIMEOUT):
        await _kill_session(process)
        await process.wait()


def failure_text(status: int | None, err: bytes) -> str:
    """Why a program did not succeed, in one line for the history."""
    if status is None:
        return "late: its session was killed"
    return f"the program {exit_text(status)}: {err[-200:].decode(errors='replace')}"


@dataclass(frozen=True)
class Write:
    """One write of the load: its op (settled at the end by mount_ends.py) and how to make
    its content again for the judge."""

    op: Op
    label: str
    name: str  # the file name its content's header carries
    size: int


@dataclass
class MountLoad:
    """The load's files (`targets`, by path under the mount), its writers and reader, and
    what they did, for the judge at the end."""

    cluster: NemesisCluster
    history: History
    seed: int
    writers: int = 2  # workers; worker i writes shapes i, i + writers, ... in turn
    timeout: float = 45.0  # one program's deadline
    targets: dict[str, Target] = field(default_factory=dict)
    inos: dict[str, int | None] = field(default_factory=dict)  # None: each write a new inode
    writes: list[Write] = field(default_factory=list)  # each file's in the order they began
    _written: Counter[str] = field(default_factory=Counter)
    reads: list[Read] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # how each line writer ended
    stopping: bool = False

    @property
    def scratch(self) -> Path:
        return self.cluster.root / "shapes-scratch"

    def path(self, file: str, mount: str = MOUNT) -> Path:
        return self.cluster.mounts.get(mount, self.cluster.mounts[MOUNT]).path / file

    @staticmethod
    def file(name: str) -> str:
        return f"{SHAPES_DIR}/{name}"

    def _full(self, file: str) -> bool:
        return self._written[file] >= WRITES_PER_FILE

    def _record(self, op: Op, label: str, name: str, size: int, failure: str,
                cut: bool = False) -> None:
        """A write has ended: `ok` if its program succeeded, else `info` (settled later)."""
        self.writes.append(Write(op, label, name, size))
        self._written[op.file] += 1
        if failure:
            self.history.complete(op, INFO, error=failure, cut=cut)
        else:
            self.history.complete(op, OK)

    # ------------------------------------------------------------ before the faults

    async def setup(self, client: Client) -> None:
        """The directory, keeping every version, and each file with an old content."""
        root = await client.resolve("/")
        d = await client.mkdir(root.ino, SHAPES_DIR.encode(), 0o755, 0, 0)
        await client.setxattr(d.ino, KEEP_VERSIONS_XATTR, str(KEEP_VERSIONS_MAX).encode())
        names = [(s.name, s.in_place) for s in SHAPES] + [
            (name, True) for name in (*FORK_FILES, FORK_CP, KILLED_FILE, STOPPED_FILE)]
        for name, in_place in names:
            file = self.file(name)
            target = self.targets[file] = Target(file, in_place)
            old = make(self.seed, self.history.peek_id(), file, OLD_SIZE)
            op = self.history.invoke("setup", "write", file, WRITE_VIA, size=len(old),
                                     digest=digest(old))
            attr = await client.create(d.ino, name.encode(), 0o644, 0, 0)
            await client.write_file(attr.ino, io.BytesIO(old))
            self.inos[file] = attr.ino if in_place else None
            self.history.complete(op, OK)
            target.before(old, "old")
            if not in_place:
                target.before(b"", "the new inode, until its writer closes it")

    # ------------------------------------------------------------ under the faults

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.writers):
                nursery.start_soon(self._shapes, SHAPES[i::self.writers])
            nursery.start_soon(self._fork_rounds)
            nursery.start_soon(self._reader)

    async def _shapes(self, shapes: tuple[Shape, ...]) -> None:
        sizes = {s.name: itertools.cycle([min(n, MAX_SIZE) for n in s.sizes]) for s in shapes}
        for shape in shapes:
            (self.scratch / shape.name).mkdir(parents=True, exist_ok=True)
        while not self.stopping:
            left = [s for s in shapes if not self._full(self.file(s.name))]
            if not left:
                return
            for shape in left:
                if self.stopping:
                    return
                if not self.cluster.mount_ready() or \
                        await self._write(shape, next(sizes[shape.name])) != OK:
                    await trio.sleep(0.2)  # a dead mount is not hammered

    async def _write(self, shape: Shape, size: int) -> str:
        """One program of this shape writing its file; recorded as soon as it ends."""
        target = self.targets[self.file(shape.name)]
        content = make(self.seed, self.history.peek_id(), target.file, size)
        size = len(content)
        op = self.history.invoke(f"shape-{shape.name}", "write", target.file, WRITE_VIA,
                                 size=len(content), digest=digest(content))
        label, failure, cut = f"{shape.name}#{op.id}", CUT_SHORT, True
        try:
            command = await trio.to_thread.run_sync(
                shape.command, self.path(target.file), content, self.scratch / shape.name)
            status, _, err = await run_program(command.argv, command.stdin,
                                               timeout=self.timeout)
            failure, cut = "" if status == 0 else failure_text(status, err), status is None
        finally:
            self._record(op, label, target.file, size, failure, cut)
        return INFO if failure else OK

    async def _fork_rounds(self) -> None:
        scratch = self.scratch / "fork-loop"
        scratch.mkdir(parents=True, exist_ok=True)
        files = [self.path(self.file(name)) for name in FORK_FILES]
        for r in itertools.count():
            if self.stopping or any(self._full(self.file(n)) for n in (*FORK_FILES, FORK_CP)):
                return
            if not self.cluster.mount_ready():
                await trio.sleep(0.2)
                continue
            loop = ForkLoop(self.seed, FOREIGN_IDS + r * FORK_RANGE, files,
                            self.path(self.file(FORK_CP)), scratch, FORK_ROUND, MAX_SIZE)
            out, failure, started = scratch / f"round-{r}.out", CUT_SHORT, self.history.now()
            try:
                status, _, err = await run_program(loop.argv(), timeout=FORK_ROUND + self.timeout,
                                                   stdout=out)
                failure = "" if status == 0 else failure_text(status, err)
            finally:
                self._fork_round(out, started, failure)
            if failure:
                await trio.sleep(0.5)

    def _fork_round(self, out: Path, started: float, failure: str) -> None:
        """Record a fork-loop round's writes, numbered by the loop itself, as ops of the
        whole round: finished, failed, or cut short with the round (perhaps in a close)."""
        try:
            text = out.read_text()
        except OSError:
            text = ""
        why = {"finished": "", "failed": "its write failed (the loop's stderr says why)",
               "cut": failure or "its loop ended before it did"}
        for write in begun_by(text):
            file = str(Path(write.path).relative_to(self.path("")))
            op = self.history.invoke("fork-loop", "write", file, WRITE_VIA, op_id=write.op,
                                     at=started, size=write.size)
            self._record(op, f"fork-loop#{write.op}", write.path, write.size,
                         why[write.state], cut=write.state == "cut")

    async def _reader(self) -> None:
        rng = random.Random(f"{self.seed}/mount-r-reader")
        files = sorted(self.targets)
        while not self.stopping:
            file = rng.choice(files)
            op = self.history.invoke("mount-r-reader", "read", file, READ_VIA)
            status, data, err = await run_program(["cat", str(self.path(file, READER_MOUNT))],
                                                  timeout=self.timeout)
            if status == 0:
                self.reads.append(Read(file, key(data)))
                match = HEADER.match(data[:200])
                self.history.complete(op, OK, size=len(data), digest=digest(data),
                                      saw=int(match.group(1)) if match else None)
            else:
                self.history.complete(op, FAIL, error=failure_text(status, err))
            await trio.sleep(rng.uniform(0, 0.05) if status == 0 else rng.uniform(0.1, 0.4))

    # ------------------------------------------------------------ the nemesis's line writer

    async def interrupt_lines(self, name: str, action: Callable[[trio.Process], Awaitable[str]],
                              rng: random.Random) -> tuple[str, int]:
        """Start the line writer on `name` through the writers' mount; once it has written a
        few lines (or LINES_WAIT passed), `action` (kill it, or kill or stop its mount). It
        never closes, so nothing of it may show: a `fail` op. (what happened, lines written)"""
        file = self.file(name)
        wanted = rng.randint(*LINES_WANTED)
        op = self.history.invoke("nemesis", "write", file, WRITE_VIA)
        process = await trio.lowlevel.open_process(
            line_writer(self.path(file), -1, LINES_PAUSE), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        assert process.stdout is not None
        written, how = 0, "cut short"
        try:
            with trio.move_on_after(LINES_WAIT):
                while written < wanted:
                    data = await process.stdout.receive_some()
                    if not data:
                        break  # it exited (its open or a write failed)
                    written += data.count(b"\n")
            how = await action(process)
        finally:
            await reap(process)
            with trio.CancelScope(shield=True):
                await process.stdout.aclose()
            status = process.returncode
            how = f"{how} after {written} line(s); the writer " + (
                "is still running" if status is None else exit_text(status))
            self.interrupted.append(how)
            self.history.complete(op, FAIL, error=how)
        return how, written

    # ------------------------------------------------------------ the end

    async def blobs(self, client: Client) -> dict[int, set[int]]:
        """Every blob a file of the directory holds, current or kept: blob -> replicas."""
        d = await client.resolve("/" + SHAPES_DIR)
        out: dict[int, set[int]] = {}
        for _, attr in await client.listdir(d.ino):
            if attr.is_file():
                for version in await client.history(attr.ino):
                    if version.blob is not None:
                        out.setdefault(version.blob, set()).update(version.replicas)
        return out

    async def judge(self, client: Client, ends: MountEnds) -> tuple[list[Violation],
                                                                    dict[str, Any]]:
        """Once the cluster has settled and `ends` has settled the unfinished writes: every
        version of every file and every read; and no more versions repeating the one before
        them than the mount retried commits whose outcome it did not know."""
        for write in self.writes:  # a file's in the order they began
            target, content = self.targets[write.op.file], make(self.seed, write.op.id,
                                                                write.name, write.size)
            if write.op.outcome == OK:
                target.finish(content, write.label)
            elif write.op.outcome == INFO:  # still: its commit may have been decided
                target.unknown(content, write.label)
        violations: list[Violation] = []
        versions = repeats = committed = absent = 0
        for target in self.targets.values():
            try:
                listed, found = await judge_file(client, "/" + target.file, target,
                                                 repeats_ok=True)
            except DfsError as e:
                if e.code is Code.ENOENT and not target.in_place:
                    absent += 1  # its new inode was left unwritten, by a killed mount
                    continue
                violations.append(Violation("unjudged", target.file,
                                            f"its versions: {e.code.value}: {e.msg}"))
                continue
            versions += len(listed)
            repeats += repeated(listed)
            committed += len({v.key for v in listed if v.key in target.maybe})
            violations += found
        violations += judge_reads(self.targets, self.reads)
        retries = ends.retries
        if repeats > retries:
            violations.append(Violation(
                "repeated-version", SHAPES_DIR, f"{repeats} version(s) repeat the one before "
                f"them; the mount retried only {retries} commit(s) whose outcome it did not "
                "know, which could explain one each"))
        return violations, self._figures(violations, versions, repeats, retries, committed,
                                         absent)

    def _figures(self, violations: list[Violation], versions: int, repeats: int,
                 retries: int, committed: int, absent: int) -> dict[str, Any]:
        done = Counter(label.split("#")[0] for t in self.targets.values()
                       for _, label in t.finished)
        by_writer = {w: done[w] for w in (*(s.name for s in SHAPES), "fork-loop")}
        failed_reads = sum(1 for op in self.history.ops.values()
                           if op.via == READ_VIA and op.outcome == FAIL)
        certain = sum(1 for w in self.writes if w.op.outcome == FAIL)
        maybe = sum(1 for w in self.writes if w.op.outcome == INFO)
        unreported = sum(1 for w in self.writes if (w.op.error or "").startswith(UNREPORTED))
        writers = ", ".join(f"{w} {n}" for w, n in by_writer.items())
        line = (f"{len(by_writer)} writers ({writers}); "
                + summary(self.targets, versions, self.reads, violations)
                + f"; of {certain + maybe} unfinished writes ({unreported} whose program "
                f"ignored its close's error) {certain} certainly did not commit, {maybe} may "
                f"have ({committed} did); {failed_reads} reads failed; "
                f"{len(self.interrupted)} line writers interrupted mid-write; {repeats} "
                f"repeated versions ({retries} commit retries after an unknown outcome)"
                + (f"; {absent} replaced file(s) absent" if absent else ""))
        return {"line": line, "writers": by_writer, "finished": sum(by_writer.values()),
                "unfinished": certain + maybe, "unreported": unreported,
                "certainly_not_committed": certain,
                "maybe_committed": maybe, "committed_unfinished": committed,
                "interrupted": len(self.interrupted), "versions": versions,
                "reads": len(self.reads), "reads_failed": failed_reads, "repeats": repeats,
                "retries": retries, "absent": absent, "violations": len(violations)}
