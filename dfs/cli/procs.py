"""Child `dfs` processes for `dfs local up` and the test harness.

Each child runs in its own session (a Ctrl-C at the terminal reaches only the parent, which stops
the children in order), writes stdout and stderr to a log file, and is stopped by its pid alone:
SIGTERM, a grace period, then SIGKILL. A server is ready when it prints its
"dfs ... listening on HOST:PORT" line, which is looked for in the log. A child started with
`die_with_parent` gets SIGTERM from the kernel when its parent dies, however it dies (SIGKILL
included): PR_SET_PDEATHSIG, so `dfs local up` never leaves servers behind. A `Supervisor`
starts again the children that die, as a service manager would, at a bounded rate.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dfs.errors import Code, DfsError

LISTENING = re.compile(rb"^dfs [\w ]+ listening on (\S+)\s*$", re.MULTILINE)
DFS = (sys.executable, "-m", "dfs.cli.main")
PR_SET_PDEATHSIG = 1
#: A child that died is started again after RESTART_MIN_S; the pause doubles, up to
#: RESTART_MAX_S, each time it dies again within STABLE_S of its start.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0


def die_with(parent: int) -> None:
    """In a new child before exec: SIGTERM when `parent` dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent:  # it died before the prctl: nobody would signal us
        os._exit(1)


class Child:
    """One child process, restartable with the same command line."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: str | None = None
        self._log_start = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start (again); the log is appended to, and only new lines count as 'listening'."""
        if env is not None:
            self.env = dict(env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        self.address = None
        parent = os.getpid()
        preexec = (lambda: die_with(parent)) if self.die_with_parent else None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
                preexec_fn=preexec,
            )

    def poll(self) -> int | None:
        """The exit status if it has exited, else None."""
        return self.proc.poll() if self.proc else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_bytes()[self._log_start :]
        except OSError:
            return ""
        return "\n".join(text.decode(errors="replace").splitlines()[-lines:])

    def wait_listening(self, timeout: float = 30.0) -> str:
        """Wait for the 'listening on HOST:PORT' line; the address it names."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log, "rb") as f:
                    f.seek(self._log_start)
                    match = LISTENING.search(f.read())
            except OSError:
                match = None
            if match:
                self.address = match.group(1).decode()
                return self.address
            status = self.poll()
            if status is not None:
                raise DfsError(
                    Code.UNAVAILABLE,
                    f"{self.name} exited with status {status} before listening "
                    f"(log {self.log}): {self.log_tail(5)}",
                )
            if time.monotonic() > deadline:
                raise DfsError(Code.UNAVAILABLE, f"{self.name} is not listening after {timeout}s")
            time.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to timeout, then SIGKILL; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send sig; for SIGKILL wait for the exit and return its status."""
        self.send_signal(sig)
        if sig == signal.SIGKILL and self.proc is not None:
            return self.proc.wait()
        return None


def exit_text(status: int) -> str:
    """'exited with status N' or 'was killed by SIGKILL' (a negative Popen returncode)."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class _Watched:
    child: Child
    restart: bool
    note: str  # what to do about it, when it is left stopped
    started_s: float  # time.monotonic() of its last start
    pause_s: float = RESTART_MIN_S  # before the next start, should it die
    due_s: float | None = None  # dead: when it is started again (None: running or given up)
    gone: bool = False  # dead and not to be restarted, and reported so


class Supervisor:
    """Started children kept running, as a service manager would keep services: one that
    exits is started again after a pause (RESTART_MIN_S, doubling to RESTART_MAX_S while it
    keeps dying within STABLE_S of its start), so a child that dies at once every time costs
    a start every RESTART_MAX_S, not a spin; one watched with restart=False is reported and
    left stopped. Each death and each start is one line to `report`. Not a thread: the owner
    calls `check()` in its loop, so every start and stop happens in the owner's thread."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self._watched: list[_Watched] = []

    def watch(self, child: Child, *, restart: bool = True, note: str = "") -> None:
        """Look after `child` (started already) from now on; `note`: what the user may do
        when it died and is not restarted."""
        self._watched.append(_Watched(child, restart, note, time.monotonic()))

    def check(self) -> None:
        """Notice the children that died since the last check; start those that are due."""
        now_s = time.monotonic()
        for w in self._watched:
            if w.gone:
                continue
            if w.due_s is not None:
                if now_s >= w.due_s:
                    w.child.start()
                    w.started_s, w.due_s = now_s, None
                    self.report(f"{w.child.name} started again: pid {w.child.pid}")
                continue
            status = w.child.poll()
            if status is None:
                continue
            died = f"{w.child.name} (pid {w.child.pid}) {exit_text(status)}"
            if not w.restart:
                w.gone = True
                self.report(f"{died}; not restarted{w.note} (log {w.child.log})")
                continue
            if now_s - w.started_s >= STABLE_S:
                w.pause_s = RESTART_MIN_S  # it ran a good while: not a crash loop
            w.due_s = now_s + w.pause_s
            self.report(f"{died}; starting it again in {w.pause_s:g} s (log {w.child.log})")
            w.pause_s = min(w.pause_s * 2, RESTART_MAX_S)
