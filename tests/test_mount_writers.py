"""Issue 17: every version another client can see is one a writer finished (docs/mount.md).

Writers of every common shape (dfs/nemesis/mount_writers.py) rewrite files on one mount while
readers on another read them whole. With every version kept (--keep-versions), each committed
version and each read must be the file's old content or one some writer finished, and a file
rewritten in place gets exactly one version per finished write (dfs/nemesis/finished.py
judges). Then the faults, one test each: a writer killed by a signal leaves the old version;
one that exits normally without closing commits; a mount stopped or killed under a writer
drops what it held (and, stopped, says so); `echo x > f` is one new version.

`-m slow` runs the mixed run for DFS_SOAK_S seconds (default 300), in rounds of ROUND_S whose
files are judged, then removed (scripts/soak-writers). No assertion is on a duration: waits
are bounded with slack, and a negative check (no new version) is repeated after the writer's
mount is unmounted, when it has answered every request.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import random
import select
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster, run_trio
from mount_harness import Mount, mount_cluster, mounted, run, two_mounts

from dfs.meta.versions import KEEP_VERSIONS_MAX
from dfs.nemesis.checker import Violation
from dfs.nemesis.finished import (
    Read,
    Target,
    Version,
    attr_key,
    history,
    judge_file,
    judge_reads,
    judge_versions,
    key,
    summary,
)
from dfs.nemesis.mount_writers import (
    SHAPES,
    ForkLoop,
    Shape,
    finished_by,
    line_writer,
    lines,
    make,
    read_whole,
    run_writer,
)

pytestmark = pytest.mark.mount
MIXED_S = 6.0
SOAK_S = float(os.environ.get("DFS_SOAK_S", "300"))
ROUND_S = 30.0
READERS = 2
RUN_TIMEOUT = 120.0  # one writer program; killed by its pid beyond
SETTLE = 1.0  # a killed writer's close has reached the mount (checked again after unmount)
LANDED_TIMEOUT = 30.0  # for the last finished writes to land before the judge looks
OLD = b"old\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with mount_cluster(tmp_path_factory.mktemp("writers-cluster"),
                       "--keep-versions", str(KEEP_VERSIONS_MAX)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mounts(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Mount, Mount]]:
    """M1 for the writers, M2 for the readers."""
    with two_mounts(cluster, tmp_path_factory.mktemp("writers"),
                    ("m1-writers", "m2-readers")) as both:
        yield both


def judged(cluster: Cluster, targets: list[Target]) -> tuple[int, list[Violation]]:
    """Every version of the targets listed and judged: (versions, violations)."""
    async def ask() -> tuple[int, list[Violation]]:
        count, out = 0, []
        async with cluster.client() as client:
            for target in targets:
                versions, violations = await judge_file(client, "/" + target.file, target)
                count += len(versions)
                out += violations
        return count, out

    return run_trio(ask)


def assert_finished(cluster: Cluster, target: Target) -> None:
    _, violations = judged(cluster, [target])
    assert not violations, report(violations)


def listed(cluster: Cluster, path: str) -> list[Version]:
    async def ask() -> list[Version]:
        async with cluster.client() as client:
            return (await history(client, path))[1]

    return run_trio(ask)


def old_only(file: str) -> Target:
    target = Target(file)
    target.before(OLD, "old")
    return target


# ------------------------------------------------------------------ the mixed run


class MixedRun:
    """One round in directory `name`: each shape in a loop, and the fork loop, on m1; readers
    on m2; every file first holds an old content written through m1."""

    def __init__(self, cluster: Cluster, mounts: tuple[Mount, Mount], scratch: Path,
                 name: str, seed: int) -> None:
        self.cluster, (self.m1, self.m2) = cluster, mounts
        self.scratch, self.name, self.seed = scratch / name, name, seed
        self.targets: dict[str, Target] = {}
        self.ops = itertools.count(1)
        self.reads: list[Read] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        (self.m1 / name).mkdir()
        for shape in SHAPES:
            self._target(shape.name, shape.in_place)
        for file in ("fork-a", "fork-b", "fork-cp"):
            self._target(file, True)

    def _target(self, name: str, in_place: bool) -> None:
        file = f"{self.name}/{name}"
        target = self.targets[file] = Target(file, in_place)
        old = make(self.seed, next(self.ops), file, 100)
        target.before(old, "old")
        if not in_place:
            target.before(b"", "the new inode, until its writer closes it")
        (self.m1 / file).write_bytes(old)

    def run(self, seconds: float) -> None:
        self.scratch.mkdir(parents=True)
        fork = ForkLoop(self.seed, 10**6, [self.m1 / self.name / f for f in ("fork-a", "fork-b")],
                        self.m1 / self.name / "fork-cp", self.scratch, seconds)
        threads = [threading.Thread(target=self._writes, args=(s,)) for s in SHAPES]
        threads += [threading.Thread(target=self._reads, args=(i,)) for i in range(READERS)]
        loop = subprocess.Popen(fork.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for t in threads:
                t.start()
            time.sleep(seconds)
            self.stop.set()
            out, err = loop.communicate(timeout=seconds + RUN_TIMEOUT)
        finally:
            self.stop.set()
            if loop.poll() is None:
                loop.kill()
                loop.wait()
            for t in threads:
                t.join(RUN_TIMEOUT)
        if loop.returncode != 0:
            self.errors.append(f"fork loop exit {loop.returncode}: {err[-500:]!r}")
        for op, size, path in finished_by(out.decode()):
            file = str(Path(path).relative_to(self.m1.path))
            self.targets[file].finish(make(self.seed, op, path, size), f"fork-loop#{op}")

    def _writes(self, shape: Shape) -> None:
        target = self.targets[f"{self.name}/{shape.name}"]
        scratch = self.scratch / shape.name
        scratch.mkdir()
        for size in itertools.cycle(shape.sizes):
            if self.stop.is_set():
                return
            op = next(self.ops)
            content = make(self.seed, op, target.file, size)
            target.finish(content, f"{shape.name}#{op}")  # a reader may see it before exit
            try:
                done = run_writer(shape.command(self.m1 / target.file, content, scratch),
                                  RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.errors.append(f"{shape.name}#{op}: still running after {RUN_TIMEOUT} s")
                return
            if done.returncode != 0:
                self.errors.append(f"{shape.name}#{op}: exit {done.returncode}: "
                                   f"{done.stderr[-300:]!r}")
                return

    def _reads(self, seed: int) -> None:
        files, rng = list(self.targets), random.Random(seed)
        while not self.stop.is_set():
            rng.shuffle(files)
            self.reads.extend(read_whole(f, self.m2 / f) for f in files)

    def _settled(self) -> bool:
        """Whether every file's current version is its last finished write."""
        async def ask() -> bool:
            async with self.cluster.client() as client:
                for file, target in self.targets.items():
                    attr = await client.resolve("/" + file)
                    if target.finished and attr_key(attr) != target.finished[-1][0]:
                        return False
            return True

        return run_trio(ask)

    def judge(self) -> tuple[str, list[Violation]]:
        """Once the last writes have landed (a commit may follow a writer's exit; bounded,
        and judged anyway: the judge says what is missing), every version and read."""
        deadline = time.monotonic() + LANDED_TIMEOUT
        while not self._settled() and time.monotonic() < deadline:
            time.sleep(0.2)
        versions, violations = judged(self.cluster, list(self.targets.values()))
        violations += judge_reads(self.targets, self.reads)
        read = Counter(r.file for r in self.reads if r.error is None)
        violations += [Violation("unread", file, "no read of it completed") for file, t
                       in self.targets.items() if t.in_place and not read[file]]
        violations += [Violation("writer-failed", self.name, e) for e in self.errors]
        done = Counter(label.split("#")[0] for t in self.targets.values()
                       for _, label in t.finished)
        writers = [*(s.name for s in SHAPES), "fork-loop"]
        violations += [Violation("writer-idle", self.name, f"{name} finished no write")
                       for name in writers if not done[name]]
        return (f"{len(writers)} writers ({', '.join(f'{w} {done[w]}' for w in writers)}); "
                + summary(self.targets, versions, self.reads, violations)), violations

    def remove(self) -> None:
        shutil.rmtree(self.m1 / self.name)
        shutil.rmtree(self.scratch)


def report(violations: list[Violation], each: int = 3) -> str:
    """The violations by (kind, file): how many, and the first few."""
    groups: dict[tuple[str, str], list[str]] = {}
    for v in violations:
        groups.setdefault((v.kind, v.file), []).append(v.msg)
    return "\n".join(f"{kind}: {file}: {len(msgs)}: " + "; ".join(msgs[:each])
                     + ("; ..." if len(msgs) > each else "")
                     for (kind, file), msgs in groups.items())


def test_every_version_and_read_is_one_a_writer_finished(
        cluster: Cluster, mounts: tuple[Mount, Mount], tmp_path: Path) -> None:
    mixed = MixedRun(cluster, mounts, tmp_path, "mixed", 17)
    mixed.run(MIXED_S)
    line, violations = mixed.judge()
    print(f"\nmixed run, {MIXED_S:g} s: {line}")
    assert not violations, report(violations)


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_S) + 900)
def test_soak_every_version_and_read_is_one_a_writer_finished(
        cluster: Cluster, mounts: tuple[Mount, Mount], tmp_path: Path) -> None:
    rounds = max(1, math.ceil(SOAK_S / ROUND_S))
    violations: list[Violation] = []
    for r in range(rounds):
        mixed = MixedRun(cluster, mounts, tmp_path, f"soak-{r}", 1000 + r)
        mixed.run(SOAK_S / rounds)
        line, found = mixed.judge()
        print(f"\nsoak round {r + 1}/{rounds}: {line}")
        violations += found
        mixed.remove()  # deleting the files drops their kept versions: the disk stays bounded
    assert not violations, report(violations)


# ------------------------------------------------------------------ the faults


@contextlib.contextmanager
def writing(path: Path, count: int = -1, pause: float = 0.2
            ) -> Iterator[subprocess.Popen[bytes]]:
    """mount_writers.LINES writing to path; killed by its pid if still running at the end."""
    proc = subprocess.Popen(line_writer(path, count, pause), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def wait_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = 60.0) -> None:
    """Until the writer says it wrote `count` lines (bounded)."""
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + timeout, 0
    while seen < count:
        left = deadline - time.monotonic()
        assert left > 0, f"the writer wrote {seen} lines in {timeout} s"
        if select.select([proc.stdout], [], [], left)[0]:
            data = os.read(proc.stdout.fileno(), 4096)
            assert data, f"the writer exited: {proc.wait()}"
            seen += data.count(b"\n")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_writer_killed_by_a_signal_leaves_the_old_version(
        cluster: Cluster, tmp_path: Path, sig: signal.Signals) -> None:
    target = old_only(f"killed-{sig.name}")
    with mounted(cluster, tmp_path / "m", name=f"m-killed-{sig.name}") as m:
        (m / target.file).write_bytes(OLD)
        with writing(m / target.file) as proc:
            wait_lines(proc, 10)  # about 2 s of a line every 0.2 s
            os.kill(proc.pid, sig)
            assert proc.wait(60) == -sig
        time.sleep(SETTLE)
        assert_finished(cluster, target)
    assert_finished(cluster, target)


def test_b_a_writer_that_exits_without_closing_commits(cluster: Cluster, tmp_path: Path
                                                       ) -> None:
    target = old_only("exits-unclosed")
    target.finish(lines(5), "5 lines, then os._exit(0)")
    with mounted(cluster, tmp_path / "m", name="m-exits") as m:
        (m / target.file).write_bytes(OLD)
        with writing(m / target.file, count=5, pause=0.05) as proc:
            assert proc.wait(60) == 0
        cluster.wait_until(
            lambda: key(lines(5)) in [v.key for v in listed(cluster, "/" + target.file)],
            timeout=30, message="the unclosed file's content committed")
    assert_finished(cluster, target)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_cd_a_mount_stopped_under_a_writer_drops_what_it_held(
        cluster: Cluster, tmp_path: Path, sig: signal.Signals) -> None:
    target = old_only(f"mount-{sig.name}")
    # --stop-timeout bounds how long SIGTERM serves on for the (never finishing) writer.
    m = Mount(cluster, tmp_path / "m", name=f"m-{sig.name}", args=["--stop-timeout", "1"]).start()
    try:
        (m / target.file).write_bytes(OLD)
        ino = os.stat(m / target.file).st_ino
        with writing(m / target.file) as proc:
            wait_lines(proc, 5)
            assert m.child is not None and m.child.proc is not None
            if sig == signal.SIGKILL:
                m.kill()
            else:
                m.child.send_signal(sig)
                m.child.proc.wait(60)  # bounded: TimeoutExpired fails the test
        log = m.log(100_000)
    finally:
        m.stop()
    assert_finished(cluster, target)
    if sig == signal.SIGTERM:
        said = [line for line in log.splitlines() if "drop" in line.lower()
                and (target.file in line or str(ino) in line)]
        assert said, f"no log line drops {target.file} (inode {ino}):\n{log[-3000:]}"


def test_e_echo_into_an_existing_file_is_one_new_version(
        cluster: Cluster, mounts: tuple[Mount, Mount]) -> None:
    m1, m2 = mounts
    target = Target("echo/f")
    target.before(OLD, "old")
    target.finish(b"hello\n", "echo hello")
    (m1 / "echo").mkdir()
    (m1 / target.file).write_bytes(OLD)
    run("bash", "-c", 'echo hello > "$1"', "bash", m1 / target.file)
    cluster.wait_until(
        lambda: key(b"hello\n") in [v.key for v in listed(cluster, "/" + target.file)],
        timeout=30, message="echo's version committed")
    time.sleep(SETTLE)
    assert_finished(cluster, target)
    rows = cluster.dfs_json("versions", "/" + target.file)["versions"]
    assert [(r["version"], r["size"]) for r in rows] == [(2, 6), (1, 4)]
    kept = m2 / "echo" / ".versions" / "f"
    assert [(kept / n).read_bytes() for n in sorted(os.listdir(kept), key=int)] == \
        [OLD, b"hello\n"]


def test_the_judge_names_what_no_writer_finished() -> None:
    """Without a mount: a cut version is named by its header, a double commit and a lost
    write break one-version-each, an unkept version is a gap, an empty read is flagged."""
    full = make(1, 7, "f", 3000)
    target = Target("f")
    target.before(OLD, "old")
    target.finish(full, "w#7")
    target.finish(b"next\n", "w#8")
    cut = Version(2, key(full[:1024]))
    assert target.explain(full[:1024]) == "the first 1,024 of the 3,000 bytes of w#7"
    violations = judge_versions(target, [Version(1, key(OLD)), cut, Version(3, key(full)),
                                         Version(4, key(b"next\n"))], {2: "cut"})
    assert [(v.kind, v.msg) for v in violations] == [
        ("unfinished-version", "version 2: cut, which no writer finished")]
    twice = judge_versions(target, [Version(n, key(c)) for n, c in
                                    enumerate([OLD, full, full, b"next\n"], 1)])
    lost = judge_versions(target, [Version(1, key(OLD)), Version(3, key(full))])
    assert [v.kind for v in twice] == ["not-one-version-each"]
    assert [v.kind for v in lost] == ["history-gap", "not-one-version-each"]
    assert judge_versions(target, [Version(n, key(c)) for n, c in
                                   enumerate([OLD, full, b"next\n"], 1)]) == []
    reads = [Read("f", key(OLD)), Read("f", key(b"")), Read("f", None, errno.ENOENT)]
    assert [v.kind for v in judge_reads({"f": target}, reads)] == ["unfinished-read",
                                                                    "read-error"]
