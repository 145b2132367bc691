"""The mount process's presence on the host: a locked pid file, found again by mount device.

A serving mount holds an exclusive flock on its pid file for its whole life (the lock dies with
the process, so a crash never leaves a live-looking file). Two files can name it: the
`--pid-file` the operator asked for, and one in the run dir keyed by the mount's device number
(`fuse-MAJ-MIN.pid`), which `dfs umount` and `umount.dfs` find from the mount table alone and
wait on: an unmount returns only once the process has committed what open files held and
exited (docs/operations.md, "Unmounting waits for the mount process").
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

ENV_RUN_DIR = "DFS_RUN_DIR"
#: How long an unmount waits for the mount process to finish its commits and exit.
EXIT_TIMEOUT = 120.0
#: How long the process may take to exit once it has let go of its lock.
EXIT_AFTER_UNLOCK = 5.0


def run_dir() -> Path:
    """/run/dfs for root, else $XDG_RUNTIME_DIR/dfs (or /tmp/dfs-UID); DFS_RUN_DIR overrides."""
    if os.environ.get(ENV_RUN_DIR):
        return Path(os.environ[ENV_RUN_DIR])
    if os.geteuid() == 0:
        return Path("/run/dfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "dfs" if runtime else Path(f"/tmp/dfs-{os.geteuid()}")


def mount_device(mountpoint: Path | str) -> str | None:
    """The top mount's MAJ:MIN at mountpoint, from the mount table (no stat: that would wait
    on a mount that may be hung)."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == target:
                    found = fields[2]
    except OSError:
        return None
    return found


def device_pid_file(device: str) -> Path:
    return run_dir() / f"fuse-{device.replace(':', '-')}.pid"


class PidFile:
    """This process's pid in `path`, under an exclusive flock held until close()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OSError(f"{path} is held by a running mount") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def close(self) -> None:
        """Remove the file, then let go of the lock (a waiter sees it gone or unlocked)."""
        if self.fd < 0:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def wait_released(path: Path, timeout: float = EXIT_TIMEOUT) -> bool:
    """Wait until no process holds `path`'s lock (or it is gone), then until the process it
    names has exited (the lock goes a moment before the process does); False on timeout."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    deadline = time.monotonic() + timeout
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)
    # The lock goes a moment before the process does; a pid that runs on for long after it is
    # not the mount's (a stale file whose pid was reused).
    exit_deadline = min(deadline, time.monotonic() + EXIT_AFTER_UNLOCK)
    while pid is not None and _running(pid) and time.monotonic() < exit_deadline:
        time.sleep(0.01)
    return True


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie has exited: only its parent's wait is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
