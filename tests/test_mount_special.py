"""Special files and the set-ID rule on the real mount, each case run on the mount and on a
local directory and compared (as tests/test_mount_posix.py does): FIFOs, sockets and device
nodes are metadata-only inodes in dfs, and writes drop set-ID bits as Linux does."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse
from test_mount_posix import Case, same_as_local

pytestmark = pytest.mark.mount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, users)")


@pytest.fixture(scope="module")
def mnt(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    require_fuse()
    with mounted(shared_cluster, tmp_path_factory.mktemp("special")) as m:
        yield m


def kinds(d: Path) -> list[tuple[str, str, bool, bool]]:
    """Each entry's type as readdir's d_type tells it, and as lstat does."""
    with os.scandir(d) as it:
        return sorted(
            (e.name, stat.filemode(e.stat(follow_symlinks=False).st_mode)[0],
             e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False))
            for e in it
        )


# ------------------------------------------------------------------ FIFOs and sockets


def fifo_carries_data(d: Path) -> object:
    p = d / "pipe"
    os.mkfifo(p, 0o640)
    got: list[bytes] = []

    def read() -> None:
        with open(p, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    with open(p, "wb") as f:  # blocks until the reader opens: the kernel's pipe, not dfs
        f.write(b"through the kernel pipe\n" * 1000)
    reader.join(timeout=30)
    st = os.lstat(p)
    os.link(p, d / "again")
    os.rename(d / "again", d / "moved")
    linked = os.lstat(d / "moved")
    listing = kinds(d)
    os.unlink(p)
    os.unlink(d / "moved")
    return (got, stat.S_ISFIFO(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_size,
            linked.st_nlink, linked.st_ino == st.st_ino, listing, os.listdir(d))


def unix_socket_binds_and_connects(d: Path) -> object:
    path = "sock"  # relative: the mount's absolute path is over AF_UNIX's 108 bytes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        server.bind(path)  # mknod(S_IFSOCK) through the file system
        server.listen(1)
        client.connect(path)
        conn, _ = server.accept()
        client.sendall(b"hello over AF_UNIX")
        got = conn.recv(100)
        conn.close()
        st = os.lstat(path)
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            again.bind(path)
        except OSError as e:
            rebind = errno.errorcode[e.errno or 0]
        finally:
            again.close()
        listing = kinds(d)
        os.unlink(path)
    finally:
        client.close()
        server.close()
        os.chdir(cwd)
    return got, stat.S_ISSOCK(st.st_mode), st.st_size, rebind, listing, os.listdir(d)


def special_metadata(d: Path) -> object:
    p = d / "pipe"
    os.mkfifo(p)
    os.chmod(p, 0o604)
    os.utime(p, ns=(1_111_111_111_000_000_001, 1_222_222_222_000_000_002))
    st = os.lstat(p)
    os.mknod(d / "plain", 0o600)  # mknod of a regular file (no type bits) stays a file
    plain = os.lstat(d / "plain")
    try:
        os.mkfifo(p)
    except OSError as e:
        again = errno.errorcode[e.errno or 0]
    return (oct(st.st_mode), st.st_atime_ns, st.st_mtime_ns, oct(plain.st_mode), again,
            kinds(d))


def special_errors(d: Path) -> object:
    p = d / "pipe"
    os.mkfifo(p)
    out = []
    for op in (lambda: os.truncate(p, 0), lambda: os.setxattr(p, "user.x", b"1"),
               lambda: os.mkdir(p / "sub"), lambda: os.rmdir(p)):
        try:
            op()
            out.append("ok")
        except OSError as e:
            out.append(errno.errorcode[e.errno or 0])
    return out


@pytest.mark.parametrize("case", [
    fifo_carries_data, unix_socket_binds_and_connects, special_metadata, special_errors,
])
def test_fifo_and_socket_like_local_disk(case: Case, mnt: Mount, tmp_path: Path) -> None:
    same_as_local(case, mnt, tmp_path)


# ------------------------------------------------------------------ devices


def device_nodes(d: Path) -> object:
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 300))
    os.mknod(d / "big", stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
    out = []
    for name in ("null", "loop", "big"):
        st = os.lstat(d / name)
        out.append((name, stat.filemode(st.st_mode), os.major(st.st_rdev),
                    os.minor(st.st_rdev), st.st_size))
    os.chown(d / "loop", 0, 6)
    out.append(os.lstat(d / "loop").st_gid)
    out.append(kinds(d))
    for name in ("null", "loop", "big"):
        os.unlink(d / name)
    return out, os.listdir(d)


@needs_root
def test_device_nodes_like_local_disk(mnt: Mount, tmp_path: Path) -> None:
    same_as_local(device_nodes, mnt, tmp_path)


@needs_root
def test_device_nodes_open_as_the_mount_allows(mnt: Mount) -> None:
    """The kernel opens a device node itself; a FUSE mount is nodev (as fusermount makes it),
    so that is EACCES there, as on any nodev mount; dfs never sees the open."""
    p = mnt / "devnull"
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    options = next(line.split()[3] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == str(mnt.path))
    if "nodev" in options.split(","):
        with pytest.raises(PermissionError):
            open(p, "wb")
    else:
        with open(p, "wb") as f:
            f.write(b"into /dev/null")
    os.unlink(p)


# ------------------------------------------------------------------ across a remount, the CLI


@needs_root
def test_special_files_survive_a_remount_and_the_checker(
    shared_cluster: Cluster, tmp_path: Path
) -> None:
    require_fuse()
    mount = Mount(shared_cluster, tmp_path / "remount", name="remount")
    base = Path("/remounted")
    try:
        mount.start()
        d = mount.path / base.name
        d.mkdir()
        os.mkfifo(d / "pipe", 0o620)
        os.mknod(d / "tty", stat.S_IFCHR | 0o620, os.makedev(4, 64))
        os.mknod(d / "disk", stat.S_IFBLK | 0o600, os.makedev(8, 17))
        os.chmod(d / "pipe", 0o620)
        os.chmod(d / "tty", 0o620)
        cwd = os.getcwd()
        os.chdir(d)  # a relative name: AF_UNIX paths are at most 108 bytes
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind("sock")  # the name stays after the socket is closed
        finally:
            os.chdir(cwd)
        (d / "file").write_bytes(b"content")
        before = {p.name: (p.lstat().st_mode, p.lstat().st_rdev, p.lstat().st_ino)
                  for p in d.iterdir()}
        mount.stop()
        mount.start()
        after = {p.name: (p.lstat().st_mode, p.lstat().st_rdev, p.lstat().st_ino)
                 for p in d.iterdir()}
        assert after == before
        assert stat.S_ISFIFO(after["pipe"][0]) and stat.S_ISSOCK(after["sock"][0])
        assert os.major(after["disk"][1]) == 8 and os.minor(after["disk"][1]) == 17
        # The CLI names the kinds; the checker finds nothing to complain about.
        ls = shared_cluster.dfs_json("ls", str(base))
        assert {e["name"]: e["type"] for e in ls["entries"]} == {
            "pipe": "fifo", "tty": "char-device", "disk": "block-device", "sock": "socket",
            "file": "file"}
        tty = shared_cluster.dfs_json("stat", str(base / "tty"))
        assert (tty["type"], tty["major"], tty["minor"]) == ("char-device", 4, 64)
        text = shared_cluster.dfs("ls", str(base)).stdout.decode()
        assert "crw--w----" in text and "prw--w----" in text and "brw-------" in text
        assert "4, 64" in text
        cat = shared_cluster.dfs("cat", str(base / "pipe"))
        assert cat.returncode != 0 and b"fifo" in cat.stderr and b"Traceback" not in cat.stderr
        check = shared_cluster.dfs("check", "--json")
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        for name in before:
            os.unlink(d / name)
        d.rmdir()
    finally:
        mount.stop()


# ------------------------------------------------------------------ set-ID bits

SETID_SCRIPT = r"""
import errno, os
out = []
for name, op in (
    ("write", lambda p: open(p, "a").write("x")),
    ("write-sgid-noexec", lambda p: open(p, "a").write("x")),
    ("write-other", lambda p: open(p, "r+").write("x")),
    ("pwrite-twice", lambda p: [os.pwrite(fd, b"y", 0) for fd in [os.open(p, os.O_WRONLY)]
                                for _ in range(2)]),
    ("truncate", lambda p: os.truncate(p, 2)),
    ("ftruncate", lambda p: os.ftruncate(os.open(p, os.O_WRONLY), 1)),
    ("o_trunc", lambda p: open(p, "w").close()),
    ("open-no-write", lambda p: open(p, "r+").close()),
    ("chown", lambda p: os.chown(p, 1000, 1000)),
    ("chmod-sgid-outside-group", lambda p: os.chmod(p, 0o2755)),
    ("write-unlinked", lambda p: [(os.unlink(p), os.write(fd, b"x"), os.fstat(fd))[2:]
                                  for fd in [os.open(p, os.O_WRONLY)]][0]),
):
    try:
        fstat = op(name)  # a tuple holding the fstat of an unlinked file, else anything
        st = fstat[0] if isinstance(fstat, tuple) else os.stat(name)
        out.append(name + "=" + oct(st.st_mode))
    except OSError as e:
        out.append(name + "=" + errno.errorcode[e.errno])
print(" ".join(out))
"""
SETID_FILES: dict[str, tuple[int, int | tuple[int, int]]] = {  # name: (mode, uid or (uid, gid))
    "write": (0o6755, 1000), "write-sgid-noexec": (0o6745, 1000), "write-other": (0o6777, 0),
    "pwrite-twice": (0o4755, 1000), "truncate": (0o6755, 1000), "ftruncate": (0o2775, 1000),
    "o_trunc": (0o6755, 1000), "open-no-write": (0o6755, 1000), "chown": (0o6755, 1000),
    "write-unlinked": (0o6755, 1000), "chmod-sgid-outside-group": (0o0755, (1000, 0)),
}


def setid_as_user(root: Path) -> dict[str, str]:
    root.mkdir()
    os.chmod(root, 0o777)
    for name, (mode, owner) in SETID_FILES.items():
        (root / name).write_text("hello")
        uid, gid = owner if isinstance(owner, tuple) else (owner, owner)
        os.chown(root / name, uid, gid)
        os.chmod(root / name, mode)
    result = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable, "-c",
         SETID_SCRIPT], capture_output=True, text=True, timeout=60, cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return dict(item.split("=") for item in result.stdout.split())


def setid_as_root(d: Path) -> object:
    """root (CAP_FSETID) keeps the bits when writing; chown drops set-user-ID even for it."""
    out = []
    for name, op in (("write", lambda p: open(p, "a").write("x")),
                     ("o_trunc", lambda p: open(p, "w").close()),
                     ("chown", lambda p: os.chown(p, 1000, 1000))):
        p = d / name
        p.write_text("hello")
        os.chmod(p, 0o6755)
        op(p)
        out.append(oct(os.stat(p).st_mode))
    return out


@needs_root
def test_unprivileged_writes_drop_set_id_bits_like_local_disk(mnt: Mount, tmp_path: Path
                                                              ) -> None:
    there = setid_as_user(mnt / f"setid-{tmp_path.name}")
    here = setid_as_user(tmp_path / "setid")
    assert there == here
    assert set(here) == set(SETID_FILES)
    assert here["write"] == here["chmod-sgid-outside-group"] == oct(stat.S_IFREG | 0o755)


@needs_root
def test_root_writes_keep_set_id_bits_like_local_disk(mnt: Mount, tmp_path: Path) -> None:
    same_as_local(setid_as_root, mnt, tmp_path)


# ------------------------------------------------------------------ fallocate


def _fallocate(fd: int, mode: int, offset: int, length: int) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"


FALLOC_MODES = {"allocate": 0, "keep-size": 1, "punch-hole": 1 | 2, "collapse-range": 8,
                "zero-range": 16, "insert-range": 32}


def test_fallocate_behaves_as_before(mnt: Mount) -> None:
    """pyfuse3 has no fallocate handler, so fallocate(2) in every mode is EOPNOTSUPP (the
    kernel's answer to ENOSYS), and posix_fallocate falls back to writing, as glibc does:
    this pins that (docs/mount.md), so nothing here changes it by accident."""
    p = mnt / "falloc"
    p.write_bytes(b"x" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        got = {name: _fallocate(fd, mode, 0, 4096) for name, mode in FALLOC_MODES.items()}
        os.posix_fallocate(fd, 0, 3 * 4096)
    finally:
        os.close(fd)
    assert got == dict.fromkeys(FALLOC_MODES, errno.errorcode[errno.EOPNOTSUPP])
    data = p.read_bytes()
    assert len(data) == 3 * 4096 and data[:8192] == b"x" * 8192 and data[8192:].count(0) == 4096
