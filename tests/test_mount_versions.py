"""Issue 11 part 2: a file's kept versions through the mount (docs/mount.md, "Versions and
snapshots"). Every directory D has a hidden, read-only `D/.versions`: not listed by D, one
directory per regular file, one read-only file per version holding that version's bytes; any
change under it is EROFS; `user.dfs.versions` on a file names its versions, newest first."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import COORDINATOR_ARGS, Cluster
from mount_harness import Mount, mounted, require_fuse, run

from dfs.chunks import CHUNK_SIZE
from fuse_mount.versions import VersionFile
from fuse_mount.virtual import VIRTUAL_BASE, VirtualTree

pytestmark = pytest.mark.mount
KEEP = 3
TTL = 1.0  # the mount's --attr-timeout (the default)


def content(n: int) -> bytes:
    return f"content of version {n}\n".encode() * (n * 100)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_fuse()
    cluster = Cluster(tmp_path_factory.mktemp("versions-cluster"),
                      coordinator_args=(*COORDINATOR_ARGS, "--keep-versions", str(KEEP)))
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def mount(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(cluster, tmp_path_factory.mktemp("versions") / "m", name="mount-v") as m:
        yield m


@pytest.fixture(scope="module")
def written(mount: Mount) -> Path:
    """d/f written through the mount 5 times (each close commits: versions 1-5; 2-4 are kept),
    next to a subdirectory and a symlink, which have no versions."""
    d = mount / "d"
    d.mkdir()
    for n in range(1, 6):
        with open(d / "f", "wb") as f:
            f.write(content(n))
    os.chmod(d / "f", 0o640)
    (d / "sub").mkdir()
    os.symlink("f", d / "link")
    return d


def soon(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def refused(call: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(OSError) as caught:
        call(*args)
    return caught.value.errno


def test_versions_are_hidden_listed_and_read_as_they_were(
        cluster: Cluster, written: Path) -> None:
    d, vdir = written, written / ".versions"
    assert sorted(os.listdir(d)) == ["f", "link", "sub"]  # hidden, as .zfs with snapdir=hidden
    assert stat.S_ISDIR(os.stat(vdir).st_mode)
    assert os.listdir(vdir) == ["f"]  # regular files only
    assert sorted(os.listdir(vdir / "f"), key=int) == ["2", "3", "4", "5"]
    rows = {r["version"]: r for r in cluster.dfs_json("versions", "/d/f")["versions"]}
    f_st = os.stat(d / "f")
    inos = set()
    for n in (2, 3, 4, 5):
        path = vdir / "f" / str(n)
        assert path.read_bytes() == content(n)
        st = os.stat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o440
        assert (st.st_size, st.st_mtime_ns) == (len(content(n)), rows[n]["mtime_ns"])
        assert (st.st_uid, st.st_gid) == (f_st.st_uid, f_st.st_gid)
        assert st.st_ino >= VIRTUAL_BASE and os.stat(path).st_ino == st.st_ino
        inos.add(st.st_ino)
    assert len(inos) == 4 and f_st.st_ino not in inos
    with open(vdir / "f" / "3", "rb") as held:  # the number stays while the kernel holds it
        assert os.fstat(held.fileno()).st_ino == os.stat(vdir / "f" / "3").st_ino
    for missing in ("f/1", "f/6", "f/0", "f/03", "f/x", "sub", "link", "nothing", "f/.versions"):
        assert refused(os.stat, vdir / missing) == errno.ENOENT, missing
    assert os.listdir(d.parent / ".versions") == []  # the root has one too (no files in it)


def test_real_programs_copy_and_list_versions(written: Path, tmp_path: Path) -> None:
    vfile = written / ".versions" / "f"
    run("cp", vfile / "2", tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == content(2)
    listing = run("ls", "-l", vfile).stdout.splitlines()
    assert listing[0].startswith("total")
    rows = {line.split()[-1]: line.split() for line in listing[1:]}
    assert sorted(rows, key=int) == ["2", "3", "4", "5"]
    assert all(r[0] == "-r--r-----" and int(r[4]) == len(content(int(n)))
               for n, r in rows.items())
    assert run("sha256sum", vfile / "5").stdout.split()[0] == \
        run("sha256sum", written / "f").stdout.split()[0]
    with open(vfile / "3", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == content(3)  # one version per inode: the kernel may cache and map it


def test_a_multi_chunk_version_reads_whole_and_exact(written: Path, tmp_path: Path) -> None:
    d = written.parent / "bigdir"
    d.mkdir()
    old, new = os.urandom(CHUNK_SIZE * 2 + 12345), os.urandom(CHUNK_SIZE + 7)
    (d / "big").write_bytes(old)
    (d / "big").write_bytes(new)
    run("cp", d / ".versions" / "big" / "1", tmp_path / "old")
    assert (tmp_path / "old").read_bytes() == old
    with open(d / ".versions" / "big" / "1", "rb") as f:
        f.seek(CHUNK_SIZE - 10)
        assert f.read(20) == old[CHUNK_SIZE - 10:CHUNK_SIZE + 10]  # across a chunk boundary
    assert (d / ".versions" / "big" / "2").read_bytes() == new == (d / "big").read_bytes()


def test_every_change_under_versions_is_erofs(written: Path) -> None:
    d, vdir = written, written / ".versions"
    v3 = vdir / "f" / "3"
    changes: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
        ("open w", open, (v3, "w")), ("open r+", open, (v3, "r+b")), ("open a", open, (v3, "a")),
        ("create", open, (vdir / "f" / "9", "w")), ("create in .versions", open, (vdir / "g", "w")),
        ("unlink", os.unlink, (v3,)), ("mkdir", os.mkdir, (vdir / "x",)),
        ("mkdir in file dir", os.mkdir, (vdir / "f" / "x",)),
        ("rmdir file dir", os.rmdir, (vdir / "f",)), ("rmdir .versions", os.rmdir, (vdir,)),
        ("rename out", os.rename, (v3, d / "out")), ("rename in", os.rename, (d / "f", vdir / "h")),
        ("rename .versions", os.rename, (vdir, d / "renamed")),
        ("truncate", os.truncate, (v3, 0)), ("chmod", os.chmod, (v3, 0o644)),
        ("utime", os.utime, (v3, (1, 1))), ("chown", os.chown, (v3, 1, 1)),
        ("setxattr", os.setxattr, (v3, "user.x", b"1")),
        ("removexattr", os.removexattr, (v3, "user.x")),
        ("symlink", os.symlink, ("f", vdir / "f" / "s")),
        ("link", os.link, (d / "f", vdir / "f" / "l")), ("mkfifo", os.mkfifo, (vdir / "p",)),
    ]
    for what, call, args in changes:
        assert refused(call, *args) == errno.EROFS, what
    assert v3.read_bytes() == content(3) and (d / "f").read_bytes() == content(5)
    assert sorted(os.listdir(vdir / "f"), key=int) == ["2", "3", "4", "5"]
    assert sorted(os.listdir(d)) == ["f", "link", "sub"]


def test_the_versions_xattr_names_them_newest_first(written: Path) -> None:
    f = written / "f"
    assert os.getxattr(f, "user.dfs.versions") == b"5,4,3,2"
    assert "user.dfs.versions" not in os.listxattr(f)  # virtual: cp -a must not copy it
    assert refused(os.setxattr, f, "user.dfs.versions", b"1") == errno.EPERM
    assert refused(os.getxattr, written / "sub", "user.dfs.versions") == errno.ENODATA
    fresh = written / "new"
    fresh.write_bytes(b"one")
    assert os.getxattr(fresh, "user.dfs.versions") == b"1"
    assert os.listdir(written / ".versions" / "new") == ["1"]


def test_a_hard_link_lists_the_same_versions_under_its_own_name(written: Path) -> None:
    os.link(written / "f", written / "g")
    try:
        vdir = written / ".versions"
        assert {"f", "g"} <= set(os.listdir(vdir))
        assert (vdir / "g" / "4").read_bytes() == content(4)
        assert sorted(os.listdir(vdir / "g"), key=int) == ["2", "3", "4", "5"]
    finally:
        os.unlink(written / "g")


def test_a_restore_shows_as_the_new_current_version(cluster: Cluster, written: Path) -> None:
    d = written
    (d / "r").write_bytes(b"first")
    (d / "r").write_bytes(b"second, longer")
    assert sorted(os.listdir(d / ".versions" / "r")) == ["1", "2"]
    done = cluster.dfs("restore", "/d/r", "--version", "1")
    assert done.returncode == 0, done.stderr
    time.sleep(TTL + 0.2)  # what the kernel cached of d/r expires
    assert os.stat(d / "r").st_size == len(b"first")
    assert (d / "r").read_bytes() == b"first"
    assert os.getxattr(d / "r", "user.dfs.version") == b"3"
    assert os.getxattr(d / "r", "user.dfs.versions") == b"3,2,1"
    assert sorted(os.listdir(d / ".versions" / "r")) == ["1", "2", "3"]
    assert (d / ".versions" / "r" / "3").read_bytes() == b"first"
    assert (d / ".versions" / "r" / "2").read_bytes() == b"second, longer"


def test_renames_and_removals_show_under_versions(written: Path) -> None:
    d = written / "moving"
    d.mkdir()
    (d / "a").write_bytes(b"a1")
    (d / "a").write_bytes(b"a2")
    assert os.listdir(d / ".versions") == ["a"]
    assert sorted(os.listdir(d / ".versions" / "a")) == ["1", "2"]
    os.rename(d / "a", d / "b")
    assert os.listdir(d / ".versions") == ["b"]
    # A change made here reaches what the kernel cached under .versions well before the
    # entry timeout (the mount invalidates those entries, after its reply).
    gone = soon(lambda: not os.path.exists(d / ".versions" / "a"), within=TTL / 2)
    assert gone, "d/.versions/a still answered after the rename"
    assert refused(os.stat, d / ".versions" / "a") == errno.ENOENT
    assert (d / ".versions" / "b" / "1").read_bytes() == b"a1"
    run("rm", "-rf", d)  # its .versions, never listed, does not stop the removal
    assert not d.exists()
    assert "moving" not in os.listdir(written / ".versions")


def test_virtual_numbers_are_disjoint_stable_while_held_and_never_reused() -> None:
    tree = VirtualTree(None, None, None, None, None, {})  # type: ignore[arg-type]
    make: Callable[[], VersionFile] = lambda: VersionFile(VIRTUAL_BASE + 1, 5, 3)  # noqa: E731
    a = tree.node(("version", 5, 3), make)
    a.lookups += 2
    assert a.ino > VIRTUAL_BASE and tree.node(("version", 5, 3), make) is a
    tree.forget(a.ino, 1)
    assert tree.node(("version", 5, 3), make).ino == a.ino  # still held once
    tree.forget(a.ino, 1)
    assert len(tree) == 0
    b = tree.node(("version", 5, 3), make)
    assert b.ino != a.ino  # a number the kernel forgot is never given again
    tree.unheld(b)  # made for a request that failed: nothing holds it
    assert len(tree) == 0
