"""Which close ends a write (fuse_mount/closes.py), read off real processes' /proc: the facts
the mount judges a FLUSH by, for the shapes of writer that docs/design.md §7 names. No FUSE
needed: the rule reads the same /proc fields for a file on any file system, so the file here
lives on the file system of the test's tmp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_mount.closes import ProcReader, Verdict, Writer, judge

WAIT_S = 20.0  # bound on a child reaching the state a case needs (slack for a busy machine)


def mount_root(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


@pytest.fixture
def reader(tmp_path: Path) -> ProcReader:
    proc = ProcReader(mount_root(tmp_path))
    assert proc.device is not None
    return proc


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    return path


def child(code: str, *args: str) -> subprocess.Popen[bytes]:
    """A Python child that prints "ready" once it is in the state under test."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)


def verdict(reader: ProcReader, pid: int, path: Path, own: int = 0) -> tuple[Verdict, str]:
    writer = reader.writer(pid)
    assert writer is not None
    return judge(reader.facts(writer, os.stat(path).st_ino, own))


def wait_state(pid: int, states: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in states:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never reached state {states}")


HOLD = """
import os, sys, time
fd = os.open(sys.argv[1], int(sys.argv[2]))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_writer_holding_a_descriptor_open_for_writing_is_not_done(
        reader: ProcReader, target: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A shell's `cmd > f` after dup2: the original is closed, fd 1 still writes."""
    proc = child(HOLD, str(target), str(os.O_WRONLY))
    procs.append(proc)
    assert verdict(reader, proc.pid, target)[0] is Verdict.WAIT
    # ... unless that descriptor is the writer's other handle, which the mount counts.
    assert verdict(reader, proc.pid, target, own=1)[0] is Verdict.COMMIT


def test_a_read_only_descriptor_does_not_hold_a_write_back(
        reader: ProcReader, target: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Python's mmap keeps a dup of a read-only fd: it is never a writable handle's."""
    proc = child(HOLD, str(target), str(os.O_RDONLY))
    procs.append(proc)
    assert verdict(reader, proc.pid, target) == (Verdict.COMMIT,
                                                 "this close is the writer's end")


FORK = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
pid = os.fork()
if pid == 0:
    time.sleep(600)  # the child holds the inherited descriptor, as between fork and exec
    os._exit(0)
os.close(fd)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_forked_child_holding_the_file_means_the_write_goes_on(
        reader: ProcReader, target: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    proc = child(FORK, str(target))
    procs.append(proc)
    writer = reader.writer(proc.pid)
    assert writer is not None
    facts = reader.facts(writer, os.stat(target).st_ino, 0)
    assert judge(facts) == (Verdict.WAIT, "a child of the opener holds it")
    # The child is remembered as a holder: if it dies by a signal, the write is dropped.
    (kid, start), = writer.holders
    os.kill(kid, signal.SIGKILL)
    wait_state(kid, "Z")
    assert judge(reader.facts(writer, os.stat(target).st_ino, 0))[0] is Verdict.KILLED


def test_a_writer_killed_by_a_signal_is_killed_and_one_that_exits_is_done(
        reader: ProcReader, target: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A zombie shows how it ended (the FLUSH of a dying writer sees the same, earlier)."""
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = child(HOLD, str(target), str(os.O_WRONLY))
        procs.append(proc)
        writer = reader.writer(proc.pid)
        assert writer is not None
        proc.send_signal(sig)
        wait_state(proc.pid, "Z")  # not reaped yet: /proc still has it
        facts = reader.facts(writer, os.stat(target).st_ino, 0)
        assert facts.opener is not None and facts.opener.signal == sig
        assert judge(facts)[0] is Verdict.KILLED
        proc.wait(WAIT_S)
        # Reaped: how it ended can no longer be read, so only RELEASE decides.
        assert judge(reader.facts(writer, os.stat(target).st_ino, 0))[0] is Verdict.WAIT

    proc = subprocess.Popen([sys.executable, "-c", "import os, sys; "
                             "fd = os.open(sys.argv[1], os.O_WRONLY); "
                             "print('ready', flush=True); sys.stdin.read(); os._exit(3)",
                             str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == b"ready"
    writer = reader.writer(proc.pid)
    assert writer is not None
    proc.stdin.close()
    wait_state(proc.pid, "Z")
    facts = reader.facts(writer, os.stat(target).st_ino, 0)
    assert facts.opener is not None and facts.opener.exiting and facts.opener.signal == 0
    assert judge(facts)[0] is Verdict.COMMIT


def test_a_reused_pid_is_not_the_writer(reader: ProcReader) -> None:
    me = reader.writer(os.getpid())
    assert me is not None and me.pid == os.getpid()
    impostor = Writer(me.pid, me.start + 1)
    assert reader.alive(impostor.pid, impostor.start) is None
