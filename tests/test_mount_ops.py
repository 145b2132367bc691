"""Mounting the way Linux users mount (docs/operations.md): `dfs mount` in the background,
`mount -t dfs` through /sbin/mount.dfs, an fstab line (a tmp fstab via `mount -T`, never
/etc/fstab), and `umount` that returns only once the mount process has finished and exited."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from mount_harness import require_fuse, run

from dfs.cli.procs import DFS, Child
from fuse_mount.main import is_mounted

pytestmark = pytest.mark.mount
BIN = Path(sys.executable).parent
HELPERS = {Path("/sbin/mount.dfs"): BIN / "mount.dfs",
           Path("/sbin/umount.fuse.dfs"): BIN / "umount.fuse.dfs"}


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def helpers(fuse_ok: None) -> Iterator[None]:
    """/sbin/mount.dfs and /sbin/umount.fuse.dfs (what `scripts/install --mount-helper` puts
    there) for the length of this module; ours are removed afterwards, others left alone."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) helpers live in /sbin: needs root")
    made = []
    for link, target in HELPERS.items():
        if not target.exists():
            pytest.fail(f"{target} is missing: run scripts/install (it installs the entry points)")
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            pytest.skip(f"{link} is another install's; not replacing it")
        link.symlink_to(target)
        made.append(link)
    try:
        yield
    finally:
        for link in made:
            link.unlink()


def alive(pid: int) -> bool:
    """Whether pid still runs (a zombie has exited; only its parent's wait is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@contextlib.contextmanager
def cleanup(path: Path, pid_file: Path) -> Iterator[None]:
    """Whatever happens: detach the mount and stop its process by the pid it wrote."""
    pid = None
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
        if is_mounted(path):
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, timeout=30)
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The run dir (pid files by mount device) under the test's tmp dir."""
    return {"DFS_RUN_DIR": str(tmp_path / "run")}


def test_dfs_mount_returns_once_the_mount_answers(
    fuse_ok: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    """`dfs mount` detaches by default: when it exits 0 the mount serves, the serving
    process's pid is in --pid-file, and `dfs umount` returns only after that process, having
    committed what it held, has exited."""
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    with cleanup(mnt, pid_file):
        result = shared_cluster.dfs("mount", str(mnt), "--cache-dir", str(tmp_path / "cache"),
                                    "--pid-file", str(pid_file), env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == f"dfs mount ready at {mnt}"
        assert os.statvfs(mnt).f_bsize > 0 and os.path.ismount(mnt)
        pid = int(pid_file.read_text())
        assert alive(pid)
        (mnt / "bg.txt").write_bytes(b"written through a background mount")
        result = shared_cluster.dfs("umount", str(mnt), env=env)
        assert result.returncode == 0, result.stderr
        assert not alive(pid), "dfs umount returned while the mount process was still running"
        assert not pid_file.exists() and not is_mounted(mnt)
    assert shared_cluster.dfs("cat", "/bg.txt").stdout == b"written through a background mount"


def test_dfs_mount_that_cannot_mount_exits_1_with_the_reason(
    fuse_ok: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    with cleanup(mnt, pid_file):
        result = shared_cluster.dfs("--coordinator", "127.0.0.1:1", "mount", str(mnt),
                                    "--cache-dir", str(tmp_path / "cache"), "--retry-timeout",
                                    "1", "--pid-file", str(pid_file), env=env)
        assert result.returncode == 1
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"dfs: {mnt}: "), lines
        assert "127.0.0.1:1" in lines[0]
        assert not is_mounted(mnt) and not pid_file.exists()


def test_mount_t_dfs_and_umount_waits_for_the_mount_process(
    helpers: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    """`mount -t dfs HOST:PORT,HOST:PORT DIR -o secret_file=...` mounts through /sbin/mount.dfs (generic
    options ignored); `umount DIR` goes through umount.fuse.dfs and returns after the mount
    process exited."""
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    options = (f"secret_file={shared_cluster.secret_file},cache_dir={tmp_path / 'cache'},"
               f"pid_file={pid_file},_netdev,defaults,nofail,x-systemd.mount-timeout=30")
    with cleanup(mnt, pid_file):
        # A coordinator list (HOST:PORT,HOST:PORT): the first that answers is the one used.
        spec = f"127.0.0.1:1,{shared_cluster.coordinator}"
        run("mount", "-t", "dfs", spec, mnt, "-o", options, env=env)
        fields = next(line.split() for line in Path("/proc/self/mounts").read_text().splitlines()
                      if line.split()[1] == str(mnt))
        assert fields[2] == "fuse.dfs"
        pid = int(pid_file.read_text())
        (mnt / "via-mount-8.txt").write_bytes(b"mount -t dfs")
        run("umount", mnt, env=env)
        assert not alive(pid), "umount returned while the mount process was still running"
        assert not is_mounted(mnt)
    assert shared_cluster.dfs("cat", "/via-mount-8.txt").stdout == b"mount -t dfs"


def test_fstab_line_read_only(
    helpers: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    """An fstab line with _netdev (here a tmp fstab through `mount -T`): `mount DIR` mounts
    it; with ro, reads work and writes fail with EROFS."""
    shared_cluster.dfs("put", "-", "/fstab.txt", input=b"from fstab")
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a dfs mount, as /etc/fstab would hold it\n"
        f"{shared_cluster.coordinator} {mnt} dfs secret_file={shared_cluster.secret_file},"
        f"cache_dir={tmp_path / 'cache'},pid_file={pid_file},ro,_netdev,noauto 0 0\n"
    )
    with cleanup(mnt, pid_file):
        run("mount", "-T", fstab, mnt, env=env)
        assert (mnt / "fstab.txt").read_bytes() == b"from fstab"
        with pytest.raises(OSError) as raised:
            (mnt / "new.txt").write_bytes(b"no")
        assert raised.value.errno == errno.EROFS
        pid = int(pid_file.read_text())
        run("umount", mnt, env=env)
        assert not alive(pid) and not is_mounted(mnt)


def test_dfs_mount_foreground_is_todays_behaviour(
    fuse_ok: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    """--foreground stays attached: the process we started is the mount, it tells systemd
    READY=1 once it answers, logs JSON lines with --log-format json, and exits 0 once
    fusermount3 -u detaches the mount."""
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    log = tmp_path / "mount.log"
    with cleanup(mnt, pid_file), open(log, "wb") as stderr, notify:
        proc = subprocess.Popen(
            [*DFS, "--coordinator", shared_cluster.coordinator, "--secret-file",
             str(shared_cluster.secret_file), "--log-format", "json", "mount", str(mnt),
             "--foreground", "--cache-dir", str(tmp_path / "cache"), "--pid-file", str(pid_file)],
            stdout=subprocess.PIPE, stderr=stderr,
            env={**os.environ, **env, "NOTIFY_SOCKET": str(tmp_path / "notify"),
                 "DFS_LOG_LEVEL": "INFO"},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"dfs mount ready at {mnt}"
        ready = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        assert ready["READY"] == "1" and int(ready["MAINPID"]) == proc.pid
        assert int(pid_file.read_text()) == proc.pid
        run("fusermount3", "-u", mnt)
        assert proc.wait(timeout=30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all(r["process"] == "mount" and r["pid"] == proc.pid for r in records)
    assert any(r["message"] == f"unmounted {mnt}" for r in records)


def test_lazy_unmount_commits_the_open_file_before_the_process_exits(
    fuse_ok: None, shared_cluster: Cluster, tmp_path: Path, env: dict[str, str]
) -> None:
    """`dfs umount` of a mount with a file open for writing fails (busy) and changes nothing;
    `--lazy` detaches it at once, the writer goes on, and its close commits the whole file
    before the mount process exits."""
    mnt, pid_file = tmp_path / "mnt", tmp_path / "mount.pid"
    mnt.mkdir()
    with cleanup(mnt, pid_file):
        result = shared_cluster.dfs("mount", str(mnt), "--cache-dir", str(tmp_path / "cache"),
                                    "--pid-file", str(pid_file), env=env)
        assert result.returncode == 0, result.stderr
        pid = int(pid_file.read_text())
        with open(mnt / "lazy.txt", "wb") as f:
            f.write(b"before the unmount, ")
            busy = shared_cluster.dfs("umount", str(mnt), env=env)
            assert busy.returncode == 1 and is_mounted(mnt)
            assert len(busy.stderr.decode().splitlines()) == 1
            lazy = shared_cluster.dfs("umount", str(mnt), "--lazy", env=env)
            assert lazy.returncode == 0, lazy.stderr
            assert not is_mounted(mnt) and alive(pid)
            f.write(b"after it")
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, "the mount process did not exit"
            time.sleep(0.05)
    assert shared_cluster.dfs("cat", "/lazy.txt").stdout == b"before the unmount, after it"


def test_local_up_mount_goes_with_it_on_sigkill(fuse_ok: None, tmp_path: Path) -> None:
    """kill -9 of `dfs local up --mount DIR`: its mount child gets SIGTERM from the kernel,
    unmounts and exits with the servers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    mnt = tmp_path / "mnt"
    up = Child("local-up", [*DFS, "--coordinator", address, "local", "up", "--dir",
                            str(tmp_path / "c"), "--nodes", "1", "--replicas", "1",
                            "--mount", str(mnt)],
               tmp_path / "up.log", env={"XDG_CACHE_HOME": str(tmp_path / "xdg"),
                                         "DFS_RUN_DIR": str(tmp_path / "run")})
    up.start()
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops" not in up.log.read_bytes():
            assert up.running(), up.log_tail()
            assert time.monotonic() < deadline, up.log_tail()
            time.sleep(0.1)
        pids = [int(p) for p in re.findall(r"pid (\d+)", up.log.read_text())]
        assert len(pids) == 3 and is_mounted(mnt)
        up.kill(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids) or is_mounted(mnt):
            assert time.monotonic() < deadline, "children outlived dfs local up"
            time.sleep(0.05)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
