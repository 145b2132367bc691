"""Child `dfs` processes for `dfs local up` and the test harness.

Each child runs in its own session (a Ctrl-C at the terminal reaches only the parent, which stops
the children in order), writes stdout and stderr to a log file, and is stopped by its pid alone:
SIGTERM, a grace period, then SIGKILL. A server is ready when it prints its
"dfs ... listening on HOST:PORT" line, which is looked for in the log. A child started with
`die_with_parent` gets SIGTERM from the kernel when its parent dies, however it dies (SIGKILL
included): PR_SET_PDEATHSIG, so `dfs local up` never leaves servers behind.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from dfs.errors import Code, DfsError

LISTENING = re.compile(rb"^dfs [\w ]+ listening on (\S+)\s*$", re.MULTILINE)
DFS = (sys.executable, "-m", "dfs.cli.main")
PR_SET_PDEATHSIG = 1


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
