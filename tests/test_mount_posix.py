"""POSIX behaviour of the mount, each case run on the mount and on a local directory and
compared: the same results, the same errno (docs/design.md §7)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse

from dfs.chunks import CHUNK_SIZE

pytestmark = pytest.mark.mount

Case = Callable[[Path], object]


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def mnt(fuse_ok: None, shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Mount]:
    with mounted(shared_cluster, tmp_path_factory.mktemp("posix")) as m:
        yield m


def outcome(case: Case, root: Path) -> object:
    try:
        return case(root)
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno or 0, e.errno))


def same_as_local(case: Case, mnt: Mount, tmp_path: Path) -> object:
    there = mnt / f"{case.__name__}-{os.getpid()}-{tmp_path.name}"
    here = tmp_path / "local"
    there.mkdir()
    here.mkdir()
    got, want = outcome(case, there), outcome(case, here)
    assert got == want, f"{case.__name__}: mount {got!r}, local disk {want!r}"
    return got


# ------------------------------------------------------------------ file content


def o_append(d: Path) -> object:
    p = d / "f"
    p.write_text("abc")
    with open(p, "a") as f:
        f.write("def")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"ghi")  # lands at the end whatever the offset
    size = os.fstat(fd).st_size
    os.close(fd)
    return p.read_text(), size


def o_trunc(d: Path) -> object:
    p = d / "f"
    p.write_text("abcdef")
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    size = os.fstat(fd).st_size
    os.write(fd, b"xy")
    os.close(fd)
    return size, p.read_text()


def o_excl(d: Path) -> object:
    p = d / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    mode = stat.S_IMODE(os.stat(p).st_mode)
    os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    return mode


def sparse_writes(d: Path) -> object:
    p = d / "f"
    with open(p, "wb") as f:
        f.seek(3 * CHUNK_SIZE + 5)
        f.write(b"z")
        f.seek(CHUNK_SIZE - 1)
        f.write(b"yy")  # across a chunk boundary
    data = p.read_bytes()
    return len(data), data.count(0), data[CHUNK_SIZE - 1 : CHUNK_SIZE + 1], data[-1:]


def truncate_both_ways(d: Path) -> object:
    p = d / "f"
    p.write_bytes(b"abcdef" * 1000)
    with open(p, "r+b") as f:
        f.truncate(3)
    shrunk = p.read_bytes()
    os.truncate(p, 2 * CHUNK_SIZE + 7)  # extend: zeros
    grown = p.read_bytes()
    os.truncate(p, 2)
    return shrunk, len(grown), grown[:4], grown.count(0), p.read_bytes()


def write_read_same_handle(d: Path) -> object:
    with open(d / "f", "w+b") as f:
        f.write(b"0123456789")
        f.seek(3)
        f.write(b"abc")
        f.seek(0)
        first = f.read()
        f.truncate(4)
        f.seek(0, os.SEEK_END)
        return first, f.tell()


def overwrite_middle_of_big_file(d: Path) -> object:
    p = d / "f"
    p.write_bytes(bytes(range(256)) * (CHUNK_SIZE // 128))  # 2 MiB
    with open(p, "r+b") as f:
        f.seek(CHUNK_SIZE - 2)
        f.write(b"MIDDLE")
    data = p.read_bytes()
    return len(data), data[CHUNK_SIZE - 4 : CHUNK_SIZE + 6], data[-3:]


@pytest.mark.parametrize("case", [
    o_append, o_trunc, o_excl, sparse_writes, truncate_both_ways, write_read_same_handle,
    overwrite_middle_of_big_file,
])
def test_content_like_local_disk(case: Case, mnt: Mount, tmp_path: Path) -> None:
    same_as_local(case, mnt, tmp_path)


# ------------------------------------------------------------------ errors


def enoent(d: Path) -> object:
    return os.stat(d / "nope")


def enoent_parent(d: Path) -> object:
    return open(d / "nope" / "x", "w")


def eexist(d: Path) -> object:
    (d / "x").mkdir()
    (d / "x").mkdir()


def enotempty(d: Path) -> object:
    (d / "x" / "y").mkdir(parents=True)
    os.rmdir(d / "x")


def enotdir(d: Path) -> object:
    (d / "f").write_text("")
    os.mkdir(d / "f" / "sub")


def enotdir_rmdir(d: Path) -> object:
    (d / "f").write_text("")
    os.rmdir(d / "f")


def eisdir_open(d: Path) -> object:
    (d / "x").mkdir()
    return open(d / "x", "w")


def eisdir_unlink(d: Path) -> object:
    (d / "x").mkdir()
    os.unlink(d / "x")


def enametoolong(d: Path) -> object:
    return open(d / ("n" * 256), "w")


def enametoolong_stat(d: Path) -> object:
    return os.stat(d / ("n" * 300))


def rename_dir_over_file(d: Path) -> object:
    (d / "x").mkdir()
    (d / "f").write_text("")
    os.rename(d / "x", d / "f")


def rename_dir_over_nonempty(d: Path) -> object:
    (d / "x" / "y").mkdir(parents=True)
    (d / "z").mkdir()
    os.rename(d / "z", d / "x")


def rename_into_itself(d: Path) -> object:
    (d / "x" / "y").mkdir(parents=True)
    os.rename(d / "x", d / "x" / "y" / "z")


def rename_noreplace(d: Path) -> object:
    libc = ctypes.CDLL(None, use_errno=True)
    (d / "f").write_text("f")
    (d / "g").write_text("g")
    if libc.renameat2(-100, bytes(d / "f"), -100, bytes(d / "g"), 1) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def rename_exchange(d: Path) -> object:
    libc = ctypes.CDLL(None, use_errno=True)
    (d / "f").write_text("f")
    (d / "sub").mkdir()
    (d / "sub" / "inside").write_text("")
    if libc.renameat2(-100, bytes(d / "f"), -100, bytes(d / "sub"), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    return (d / "sub").read_text(), sorted(os.listdir(d / "f"))


def link_to_existing(d: Path) -> object:
    (d / "f").write_text("")
    os.link(d / "f", d / "f")


@pytest.mark.parametrize("case", [
    enoent, enoent_parent, eexist, enotempty, enotdir, enotdir_rmdir, eisdir_open,
    eisdir_unlink, enametoolong, enametoolong_stat, rename_dir_over_file,
    rename_dir_over_nonempty, rename_into_itself, rename_noreplace, link_to_existing,
])
def test_errors_like_local_disk(case: Case, mnt: Mount, tmp_path: Path) -> None:
    got = same_as_local(case, mnt, tmp_path)
    assert isinstance(got, tuple) and got[0] == "error"


# ------------------------------------------------------------------ namespace and metadata


def names_and_links(d: Path) -> object:
    (d / "f").write_text("content")
    os.link(d / "f", d / "hard")
    os.symlink("f", d / "soft")
    os.symlink("a/dangling/target", d / "dangling")
    (d / "sub").mkdir()
    os.rename(d / "hard", d / "sub" / "moved")
    st = os.stat(d / "f")
    return (
        sorted(os.listdir(d)), st.st_nlink, (d / "soft").read_text(), os.readlink(d / "dangling"),
        os.lstat(d / "dangling").st_size, (d / "sub" / "moved").read_text(),
        os.stat(d / "sub" / "moved").st_ino == st.st_ino,
    )


def metadata(d: Path) -> object:
    p = d / "f"
    p.write_text("x")
    os.chmod(p, 0o751)
    os.chown(p, 4321, 8765)
    os.utime(p, ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    st = os.stat(p)
    os.mkdir(d / "sgid")
    os.chmod(d / "sgid", 0o2775)
    os.chown(d / "sgid", 0, 777)
    (d / "sgid" / "child").mkdir()
    child = os.stat(d / "sgid" / "child")
    return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
            child.st_gid, oct(child.st_mode & 0o7000))


def xattrs(d: Path) -> object:
    p = d / "f"
    p.write_text("x")
    os.setxattr(p, "user.a", b"1")
    os.setxattr(p, "user.b", b"\x00binary\xff")
    try:
        os.setxattr(p, "user.a", b"2", os.XATTR_CREATE)
    except OSError as e:
        create_error = errno.errorcode[e.errno or 0]
    os.removexattr(p, "user.b")
    try:
        os.getxattr(p, "user.b")
    except OSError as e:
        missing = errno.errorcode[e.errno or 0]
    return sorted(os.listxattr(p)), os.getxattr(p, "user.a"), create_error, missing


@pytest.mark.parametrize("case", [names_and_links, metadata, xattrs, rename_exchange])
def test_metadata_like_local_disk(case: Case, mnt: Mount, tmp_path: Path) -> None:
    if case is metadata and os.geteuid() != 0:
        pytest.skip("chown needs root")
    same_as_local(case, mnt, tmp_path)


def test_readdir_is_stable_under_concurrent_changes(mnt: Mount) -> None:
    """Entries created and removed during a listing never make it skip or repeat others."""
    d = mnt / "busy-dir"
    d.mkdir()
    originals = {f"orig-{i:04d}-{'x' * 40}" for i in range(400)}
    for name in originals:
        (d / name).write_bytes(b"")
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            (d / f"churn-{i}").write_bytes(b"")
            if i >= 3:
                os.unlink(d / f"churn-{i - 3}")
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        seen: list[str] = []
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                if len(seen) % 25 == 0:
                    time.sleep(0.01)
    finally:
        stop.set()
        worker.join()
    listed = [n for n in seen if n.startswith("orig-")]
    assert len(listed) == len(set(listed)), "an entry was listed twice"
    assert set(listed) == originals, "an entry was skipped"


def test_virtual_xattrs(mnt: Mount, shared_cluster: Cluster) -> None:
    p = mnt / "virtual"
    p.write_bytes(b"one")
    p.write_bytes(b"two")

    async def attrs() -> object:
        async with shared_cluster.client() as c:
            return await c.resolve("/virtual")

    attr = trio.run(attrs)
    assert os.getxattr(p, "user.dfs.version") == str(attr.version).encode()
    assert int(os.getxattr(p, "user.dfs.version")) >= 2
    assert os.getxattr(p, "user.dfs.checksum") == attr.checksum.hex().encode()
    assert os.getxattr(p, "user.dfs.replicas").split(b",") == [str(r).encode()
                                                                for r in attr.replicas]
    assert "user.dfs.version" not in os.listxattr(p)  # so cp -a does not copy them
    for call in (lambda: os.setxattr(p, "user.dfs.version", b"9"),
                 lambda: os.removexattr(p, "user.dfs.checksum")):
        with pytest.raises(PermissionError):
            call()


def test_statfs_reports_cluster_space(mnt: Mount, shared_cluster: Cluster) -> None:
    st = os.statvfs(mnt.path)
    status = shared_cluster.status()
    capacity = sum(n["capacity"] for n in status["nodes"]) // status["replicas"]
    assert st.f_namemax == 255
    assert st.f_blocks * st.f_frsize == pytest.approx(capacity, rel=0.05)
    assert 0 < st.f_bavail <= st.f_blocks


# ------------------------------------------------------------------ open files


def test_unlinked_open_file_stays_readable(mnt: Mount) -> None:
    p = mnt / "doomed"
    content = os.urandom(2 * CHUNK_SIZE + 100)
    p.write_bytes(content)
    with open(p, "rb") as f:
        head = f.read(10)
        os.unlink(p)
        assert not p.exists()
        assert os.fstat(f.fileno()).st_nlink == 0
        assert head + f.read() == content
    # Replaced by rename while open: the old content stays with the open file.
    q = mnt / "replaced"
    q.write_bytes(b"old" * 1000)
    with open(q, "rb") as f:
        (mnt / "new").write_bytes(b"new")
        os.rename(mnt / "new", q)
        assert f.read() == b"old" * 1000
    assert q.read_bytes() == b"new"
    # Written after its name is gone: the writes succeed, as on a local disk.
    w = mnt / "ghost"
    with open(w, "wb") as f:
        os.unlink(w)
        f.write(b"nobody will see this")
        f.flush()
        os.fsync(f.fileno())


def test_reader_keeps_its_version_while_a_writer_commits(mnt: Mount) -> None:
    p = mnt / "versioned"
    p.write_bytes(b"A" * (3 * CHUNK_SIZE))
    with open(p, "rb") as reader:
        assert reader.read(10) == b"A" * 10
        p.write_bytes(b"B" * CHUNK_SIZE)  # a new, shorter version
        rest = reader.read()
    assert rest == b"A" * (3 * CHUNK_SIZE - 10)
    assert p.read_bytes() == b"B" * CHUNK_SIZE


def test_eacces_as_an_unprivileged_user(mnt: Mount, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    script = r"""
import errno, os, sys
root = "."  # the cwd: its ancestors (pytest's tmp dirs) are closed to other users
out = []
for op in (lambda: open(os.path.join(root, "secret")).read(),
           lambda: open(os.path.join(root, "closed", "new"), "w"),
           lambda: os.listdir(os.path.join(root, "closed")),
           lambda: os.unlink(os.path.join(root, "sticky", "roots")),
           lambda: os.chmod(os.path.join(root, "secret"), 0o777),
           lambda: os.chown(os.path.join(root, "mine"), 0, 0),
           lambda: open(os.path.join(root, "mine"), "w").write("ok")):
    try:
        op()
        out.append("ok")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(" ".join(out))
"""
    results = []
    for root in (mnt / "perm", tmp_path / "perm"):
        root.mkdir()
        os.chmod(root, 0o755)
        (root / "secret").write_text("s")
        os.chmod(root / "secret", 0o600)
        (root / "closed").mkdir(mode=0o700)
        (root / "sticky").mkdir()
        os.chmod(root / "sticky", 0o1777)
        (root / "sticky" / "roots").write_text("r")
        (root / "mine").write_text("")
        os.chown(root / "mine", 1000, 1000)
        result = subprocess.run(
            ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
             sys.executable, "-c", script],
            capture_output=True, text=True, timeout=60, cwd=root,
        )
        assert result.returncode == 0, result.stderr
        results.append(result.stdout.split())
    assert results[0] == results[1]
    assert results[0] == ["EACCES", "EACCES", "EACCES", "EPERM", "EPERM", "EPERM", "ok"]
