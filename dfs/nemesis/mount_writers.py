"""Writers of every common shape through a FUSE mount, each a real program writing one known
content, and the writer the fault tests kill (issue 17; finished.py judges what they leave).

Programs write in many shapes, and each shape meets the mount differently: one big write that
the kernel splits into many requests, many small writes, `cp`, a shell redirect (the shell
opens with O_TRUNC, dup2s and closes its descriptor before the command writes: a FLUSH of the
empty file), the builtin `echo` into a redirect, `tar -x` (a new inode, its times set before
close), `rsync` (a temporary file renamed over the name; with --inplace the same inode,
truncated after the writes), `dd conv=fsync` (the end is an fsync), and a threaded program
that forks a `cp` while another thread writes (the child inherits the writer's descriptor and
closes it at exec: a FLUSH in the middle of the write). A shape only builds the command
(`Command`): a test runs it with subprocess, the campaign with trio.run_process
(mount_load.py).

Contents are history.content_for's: a header naming an op id and the file, then seeded bytes,
so a version read back names the write it came from (finished.Target.explain).
`python -m dfs.nemesis.mount_writers fork-loop ...` is the threaded program.
"""

from __future__ import annotations

import argparse
import io
import itertools
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfs.nemesis.finished import Read, key
from dfs.nemesis.history import content_for

KiB, MB = 1024, 1_000_000
PY = sys.executable

#: One open, writes of `piece` bytes (0: all in one write call), one close.
PY_WRITE = """
import sys
path, piece = sys.argv[1], int(sys.argv[2])
data = memoryview(sys.stdin.buffer.read())
with open(path, "wb", buffering=0) as f:
    while data:
        data = data[f.write(data[:piece or len(data)]):]
"""

#: A line every `pause` s to a file opened as `open(path, "w")` does, one number per line on
#: stdout as it goes; with a count, then a normal exit that leaves the close to exit().
LINES = """
import os, sys, time
path, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
i = 0
while count < 0 or i < count:
    os.write(fd, b"line %d\\n" % i)
    print(i, flush=True)
    i += 1
    time.sleep(pause)
os._exit(0)
"""


def make(seed: int, op: int, file: str, size: int) -> bytes:
    """Write `op`'s content for `file`: its header, then seeded bytes up to `size` in all
    (size 0: the header line alone)."""
    header = len(f"dfs-nemesis op={op} file={file}\n")
    return content_for(seed, op, file, max(0, size - header))


def lines(count: int) -> bytes:
    """What LINES has written after `count` lines."""
    return b"".join(b"line %d\n" % i for i in range(count))


@dataclass(frozen=True)
class Command:
    argv: list[str]
    stdin: bytes = b""


def run_writer(command: Command, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run a writer; killed (by pid, subprocess does it) if later than timeout."""
    return subprocess.run(command.argv, input=command.stdin, capture_output=True,
                          timeout=timeout, check=False)


def line_writer(path: Path, count: int = -1, pause: float = 0.2) -> list[str]:
    """The argv of LINES: -1 writes until killed."""
    return [PY, "-c", LINES, str(path), str(count), str(pause)]


def _source(scratch: Path, content: bytes) -> Path:
    source = scratch / "source"
    source.write_bytes(content)
    return source


def _python(piece: int) -> Callable[[Path, bytes, Path], Command]:
    return lambda target, content, _: Command([PY, "-c", PY_WRITE, str(target), str(piece)],
                                              content)


def _cp(target: Path, content: bytes, scratch: Path) -> Command:
    return Command(["cp", str(_source(scratch, content)), str(target)])


def _redirect(target: Path, content: bytes, scratch: Path) -> Command:
    return Command(["bash", "-c", 'cat "$1" > "$2"', "bash", str(_source(scratch, content)),
                    str(target)])


def _echo(target: Path, content: bytes, _: Path) -> Command:
    assert content.endswith(b"\n") and content.count(b"\n") == 1, "echo writes one line"
    return Command(["bash", "-c", 'echo "$1" > "$2"', "bash", content[:-1].decode(),
                    str(target)])


def _tar(target: Path, content: bytes, scratch: Path) -> Command:
    archive = scratch / "archive.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo(target.name)
        member.size, member.mtime, member.mode = len(content), int(time.time()), 0o644
        tar.addfile(member, io.BytesIO(content))
    return Command(["tar", "-xf", str(archive), "-C", str(target.parent)])


def _rsync(*options: str) -> Callable[[Path, bytes, Path], Command]:
    # -I: copy even when size and mtime match (its quick check would skip the write).
    return lambda target, content, scratch: Command(
        ["rsync", "-I", *options, str(_source(scratch, content)), str(target)])


def _dd(target: Path, content: bytes, scratch: Path) -> Command:
    return Command(["dd", f"if={_source(scratch, content)}", f"of={target}", "bs=64k",
                    "conv=fsync", "status=none"])


@dataclass(frozen=True)
class Shape:
    """One way programs write a file. `command(target, content, scratch)` builds the program
    that writes `content` to `target` (scratch: a local directory of this writer's own, for
    its source files); `sizes` are the content sizes a loop of it cycles through; `in_place`:
    it rewrites the target's inode (tar and rsync put a new inode under the name);
    `fails_after_close`: its program goes on after the file's content is written and may
    fail on that alone (tar sets the owner, mode and times; rsync the attributes and the
    rename), so its failure does not say that its close, the commit, failed;
    `reports_close`: its exit status says whether that close failed (bash ignores the close
    ending the redirect of a builtin: `echo x > f` exits 0 when the commit failed)."""

    name: str
    sizes: tuple[int, ...]
    command: Callable[[Path, bytes, Path], Command]
    in_place: bool = True
    fails_after_close: bool = False
    reports_close: bool = True


SHAPES: tuple[Shape, ...] = (
    Shape("one-write", (4 * KiB, 1_500 * KiB, 3 * MB), _python(0)),
    Shape("small-writes", (20 * KiB, 300 * KiB), _python(4 * KiB)),
    Shape("cp", (4 * KiB, 1_500 * KiB), _cp),
    Shape("redirect", (4 * KiB, 1 * MB), _redirect),
    Shape("echo", (0,), _echo, reports_close=False),
    Shape("tar", (4 * KiB, 600 * KiB), _tar, in_place=False, fails_after_close=True),
    Shape("rsync", (4 * KiB, 1_500 * KiB), _rsync(), in_place=False, fails_after_close=True),
    Shape("rsync-inplace", (4 * KiB, 1 * MB), _rsync("--inplace"), fails_after_close=True),
    Shape("dd-fsync", (4 * KiB, 2 * MB), _dd),
)


def read_whole(file: str, path: Path) -> Read:
    """Open, read all, close: what a reader got, or its errno."""
    try:
        with open(path, "rb") as f:
            return Read(file, key(f.read()))
    except OSError as e:
        return Read(file, None, e.errno)


# ------------------------------------------------------------------ the threaded program

FORK_SIZES = (4 * KiB, 1_500 * KiB, 3 * MB)
CP_SIZES = (4 * KiB, 1 * MB)
FAILED_PAUSE = 0.2  # after a failed write: a dead mount is not hammered
FAILURES_MAX = 3  # failed writes in a row that stop a thread of the loop


@dataclass
class ForkLoop:
    """One thread rewrites `files` in turn (Python open, one write, close) while another runs
    `cp` into `cp_file` through subprocess.run (fork and exec, the child closing the writer's
    inherited descriptor): issue 17's reproducer. Each write is printed as "+ OP SIZE PATH"
    before it begins and as "OP SIZE PATH" once its close (or cp) has returned; one that
    fails (a campaign's faults) as "! OP SIZE PATH", and the loop goes on, unless
    FAILURES_MAX fail in a row (its mount is gone): then that thread stops."""

    seed: int
    first_op: int
    files: list[Path]
    cp_file: Path
    scratch: Path
    seconds: float
    max_size: int = 0  # sizes above are cut to it (0: none), to bound a campaign's disk use
    _ops: itertools.count[int] = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _failures: dict[str, int] = field(default_factory=dict)  # in a row, per thread

    def __post_init__(self) -> None:
        self._ops = itertools.count(self.first_op)

    def _say(self, *words: object) -> None:
        with self._lock:
            print(*words, flush=True)

    def _write(self, op: int, size: int, path: Path, write: Callable[..., object],
               *args: Any, **kwargs: Any) -> None:
        """One write, announced before and reported after; a failure is told on stderr."""
        thread = threading.current_thread().name
        self._say("+", op, size, path)
        try:
            write(*args, **kwargs)
        except (OSError, subprocess.CalledProcessError) as e:
            self._say("!", op, size, path)
            print(f"op {op}: {e}", file=sys.stderr, flush=True)
            self._failures[thread] = self._failures.get(thread, 0) + 1
            time.sleep(FAILED_PAUSE)
            return
        self._failures[thread] = 0
        self._say(op, size, path)

    def _size(self, sizes: tuple[int, ...], i: int) -> int:
        return min(sizes[i % len(sizes)], self.max_size or sizes[i % len(sizes)])

    def _going(self, until: float) -> bool:
        return time.monotonic() < until and self._failures.get(
            threading.current_thread().name, 0) < FAILURES_MAX

    def _writer(self, until: float) -> None:
        for i in itertools.count():
            if not self._going(until):
                return
            path, op = self.files[i % len(self.files)], next(self._ops)
            data = make(self.seed, op, str(path), self._size(FORK_SIZES, i))
            self._write(op, len(data), path, path.write_bytes, data)

    def _forker(self, until: float) -> None:
        source = self.scratch / "cp-source"
        for i in itertools.count():
            if not self._going(until):
                return
            op = next(self._ops)
            data = make(self.seed, op, str(self.cp_file), self._size(CP_SIZES, i))
            source.write_bytes(data)
            self._write(op, len(data), self.cp_file, subprocess.run,
                        ["cp", str(source), str(self.cp_file)], check=True)

    def run(self) -> None:
        until = time.monotonic() + self.seconds
        threads = [threading.Thread(target=fn, args=(until,)) for fn in
                   (self._writer, self._forker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def argv(self) -> list[str]:
        return [PY, "-m", "dfs.nemesis.mount_writers", "fork-loop", "--seed", str(self.seed),
                "--first-op", str(self.first_op), "--seconds", str(self.seconds),
                "--scratch", str(self.scratch), "--cp", str(self.cp_file),
                "--max-size", str(self.max_size), *map(str, self.files)]


def finished_by(output: str) -> list[tuple[int, int, str]]:
    """ForkLoop's printed writes: (op, size, path), in the order they finished."""
    return [write for mark, write in _printed(output) if not mark]


@dataclass(frozen=True)
class Begun:
    """A ForkLoop write as its output tells it: begun, then `finished`, `failed`, or `cut`
    (neither: its loop was killed, perhaps while it was in its close)."""

    op: int
    size: int
    path: str
    state: str


def begun_by(output: str) -> list[Begun]:
    """Every write ForkLoop began, in the order it began them."""
    began: dict[int, Begun] = {}
    for mark, (op, size, path) in _printed(output):
        state = {"+": "cut", "!": "failed"}.get(mark, "finished")
        began[op] = Begun(op, size, path, state)  # dicts keep the first insertion's place
    return list(began.values())


def _printed(output: str) -> list[tuple[str, tuple[int, int, str]]]:
    """(mark: "+" began, "!" failed, "" finished; (op, size, path)) per line ForkLoop
    printed, in order (a last line cut off by a kill is none: nothing followed it)."""
    out = []
    for line in output.split("\n")[:-1]:
        mark = line[0] if line[:2] in ("+ ", "! ") else ""
        op, size, path = (line[2:] if mark else line).split(" ", 2)
        out.append((mark, (int(op), int(size), path)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dfs.nemesis.mount_writers")
    sub = parser.add_subparsers(dest="command", required=True)
    loop = sub.add_parser("fork-loop", help=ForkLoop.__doc__)
    loop.add_argument("--seed", type=int, required=True)
    loop.add_argument("--first-op", type=int, required=True)
    loop.add_argument("--seconds", type=float, required=True)
    loop.add_argument("--scratch", type=Path, required=True)
    loop.add_argument("--cp", type=Path, required=True)
    loop.add_argument("--max-size", type=int, default=0)
    loop.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    ForkLoop(args.seed, args.first_op, args.files, args.cp, args.scratch, args.seconds,
             args.max_size).run()


if __name__ == "__main__":
    main()
