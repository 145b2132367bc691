"""Real FUSE mounts of a test cluster (tests/cluster.py), for the mount tests.

A mount is the real command (`dfs mount MOUNTPOINT --foreground`, or `python -m
fuse_mount.main` until the CLI has the subcommand) run as a child process in its own session;
--foreground keeps the process we started the one that serves, so it is stopped by its pid.
(The default, detached mode and mount(8) are tested in tests/test_mount_ops.py.)
It is ready when it prints "dfs mount ready at ...". Teardown unmounts with `fusermount3 -u`
(lazily if something still holds the mount), then waits for the process to exit and stops it by
its pid if it does not.

Without /dev/fuse or fusermount3 the mount tests skip, unless DFS_REQUIRE_FUSE=1 asks for them
to fail instead (so CI on a FUSE-capable runner cannot silently skip them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cluster import COORDINATOR_ARGS, Cluster

from dfs.cli.procs import DFS, Child
from fuse_mount.main import is_mounted

READY_TIMEOUT = 30.0
READY = b"dfs mount ready at"


def fuse_unavailable() -> str | None:
    """Why mounts cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 cannot be imported: {e}"
    return None


def require_fuse() -> None:
    why = fuse_unavailable()
    if why is not None:
        if os.environ.get("DFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"DFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)


def mount_command() -> list[str]:
    """`dfs mount` once the CLI registers it, else the mount's own entry point."""
    if importlib.util.find_spec("dfs.cli.mount") is not None:
        return [*DFS, "mount"]
    return [sys.executable, "-m", "fuse_mount.main"]


class Mount:
    """One mount of a cluster at `path`, with its own cache dir and log."""

    def __init__(
        self, cluster: Cluster, path: Path, *, name: str = "mount", args: Sequence[str] = ()
    ) -> None:
        self.cluster = cluster
        self.path = Path(path)
        self.name = name
        self.args = list(args)
        self.cache_dir = cluster.root / f"{name}-cache"
        self.child: Child | None = None

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def start(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        argv = [
            *mount_command(), str(self.path), "--foreground",
            "--coordinator", self.cluster.coordinators,
            "--secret-file", str(self.cluster.secret_file),
            "--cache-dir", str(self.cache_dir), *self.args,
        ]
        if self.child is None:
            self.child = Child(self.name, argv, self.cluster.root / f"{self.name}.log")
        self.child.argv = argv
        # The mount's pid file by device (fuse_mount/daemon.py) stays under the tmp dir too.
        self.child.start({"DFS_LOG_LEVEL": "INFO", "DFS_RUN_DIR": str(self.cluster.root / "run")})
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if READY in self.log().encode() and os.path.ismount(self.path):
                return self
            status = self.child.poll()
            if status is not None:
                raise AssertionError(f"mount exited with {status}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mount not ready after {READY_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self, lines: int = 40) -> str:
        return self.child.log_tail(lines) if self.child else ""

    def stop(self) -> None:
        """Unmount (fusermount3 -u, lazily if busy), then make sure the process is gone."""
        if self.child is None:
            return
        if is_mounted(self.path):
            for flags in (["-u"], ["-u"], ["-uz"]):
                result = subprocess.run(
                    ["fusermount3", *flags, str(self.path)], capture_output=True, timeout=30
                )
                if result.returncode == 0 or not is_mounted(self.path):
                    break
                time.sleep(0.5)
        deadline = time.monotonic() + 15
        while self.child.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.child.running():
            self.child.stop(timeout=5)  # SIGTERM, then SIGKILL, by pid

    def kill(self) -> None:
        """The mount process dies without cleanup (a crash); the mount point is detached."""
        if self.child is not None and self.child.running():
            self.child.kill(9)
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def mounted(cluster: Cluster, path: Path, **options: object) -> Iterator[Mount]:
    """A started mount, unmounted and stopped on exit whatever happens."""
    mount = Mount(cluster, path, **options)  # type: ignore[arg-type]
    try:
        yield mount.start()
    finally:
        mount.stop()


@contextlib.contextmanager
def mount_cluster(root: Path, *coordinator_args: str) -> Iterator[Cluster]:
    """A cluster for a module of mount tests (FUSE required), stopped on exit."""
    require_fuse()
    cluster = Cluster(root, coordinator_args=(*COORDINATOR_ARGS, *coordinator_args))
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@contextlib.contextmanager
def two_mounts(cluster: Cluster, root: Path, names: tuple[str, str] = ("m1", "m2")
               ) -> Iterator[tuple[Mount, Mount]]:
    """Two mounts of one cluster (a writer's and a reader's host), both stopped on exit."""
    with mounted(cluster, root / names[0], name=names[0]) as m1, \
            mounted(cluster, root / names[1], name=names[1]) as m2:
        yield m1, m2


def run(
    *argv: str | os.PathLike[str], cwd: Path | str | None = None, timeout: float = 120,
    env: dict[str, str] | None = None, check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a real program (stdin /dev/null: what pytest's caller left there is not its
    input); on failure the assertion shows its output. (`git gc` once read old log lines as
    revisions: `dfs get f /dev/null` had renamed a regular file over the device; conftest.py
    now refuses to start on such a machine.)"""
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
    return result


def tree_listing(root: Path) -> dict[str, tuple[int, int, int, int, str | int]]:
    """Every path under root: (mode, uid, gid, mtime in s, link target or size)."""
    out: dict[str, tuple[int, int, int, int, str | int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            what: str | int = os.readlink(path) if path.is_symlink() else (
                st.st_size if path.is_file() else 0
            )
            out[str(path.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime), what
            )
    return out
