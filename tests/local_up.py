"""`dfs local up` as a user runs it, for tests: a child of the test (its own session, stopped
by its pid), its children known by the pids it prints, the cluster used through the real CLI.

    with LocalUp(tmp_path, "--ha", env={"DFS_COORDINATOR": "A,B"}) as up:
        os.kill(up.pids()["node-1"], signal.SIGKILL)
        up.wait_restarted("node-1", old_pid)
        up.dfs("put", "-", "/f", input=b"data")
        assert up.stop() == 0
    assert up.leftovers() == []
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dfs.cli.procs import DFS, Child

START_TIMEOUT_S = 90.0  # --ha starts three etcd members first
# The summary's "  NAME  ADDRESS  pid N" lines, and a restart's "dfs local: NAME started
# again: pid N" (dfs/cli/procs.py, Supervisor).
PID_LINE = re.compile(r"^(?:  (\S+) +(\S*) +pid|dfs local: (\S+) started again: pid) (\d+)$",
                      re.MULTILINE)
EXPORT = re.compile(r"export DFS_COORDINATOR=(\S+)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               log: Callable[[], str] = lambda: "") -> Any:
    """Poll until the predicate is truthy (its value is returned) or fail the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s\n{log()}"
        time.sleep(0.1)


class LocalUp:
    def __init__(self, root: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.dir = root / "cluster"
        self.child = Child("local-up", [*DFS, "local", "up", "--dir", str(self.dir), *args],
                           root / "up.log", env=env)

    def __enter__(self) -> LocalUp:
        self.child.start()
        try:
            self.wait_until(lambda: "use it from another shell" in self.log()
                            or not self.child.running(), START_TIMEOUT_S, "cluster up")
            assert self.child.running(), self.log()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop it; should a child outlive it (the test failed), kill that one by its pid."""
        self.child.stop(timeout=30)
        for pid in self.leftovers():
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> int | None:
        """SIGTERM, as a Ctrl-C would: its exit status (0: stopped cleanly)."""
        return self.child.stop(timeout=30)

    def log(self) -> str:
        return self.child.log.read_text(errors="replace")

    def wait_until(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait_until(predicate, timeout_s, what, lambda: self.log()[-3000:])

    # ------------------------------------------------------------ its children

    def _pid_lines(self) -> list[tuple[str, str, int]]:
        return [(m[1] or m[3], m[2] or "", int(m[4])) for m in PID_LINE.finditer(self.log())]

    def pids(self) -> dict[str, int]:
        """Each child's pid now: the summary's, or that of its latest restart."""
        return {name: pid for name, _, pid in self._pid_lines()}

    def addresses(self) -> dict[str, str]:
        """name -> address, of the servers the summary lists with one."""
        return {name: address for name, address, _ in self._pid_lines() if address}

    def leftovers(self) -> list[int]:
        """The pids it ever printed that are still alive."""
        return [pid for _, _, pid in self._pid_lines() if alive(pid)]

    def wait_restarted(self, name: str, old_pid: int, timeout_s: float = 30.0) -> int:
        """The pid `name` was started again with (once the old one is dead)."""
        pid = self.wait_until(lambda: self.pids()[name] != old_pid and self.pids()[name],
                              timeout_s, f"restart of {name}")
        assert alive(pid) and not alive(old_pid), (pid, old_pid)
        return int(pid)

    # ------------------------------------------------------------ using it

    @property
    def coordinators(self) -> str:
        """What it says to export as DFS_COORDINATOR."""
        match = EXPORT.search(self.log())
        assert match, self.log()
        return match[1]

    def dfs(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "DFS_COORDINATOR": self.coordinators,
               "DFS_SECRET_FILE": str(self.dir / "secret")}
        return subprocess.run([*DFS, *args], env=env, input=input, capture_output=True,
                              timeout=60)

    def status(self) -> dict[str, Any] | None:
        """`dfs status --json`, or None while the cluster does not answer."""
        result = self.dfs("status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else None
