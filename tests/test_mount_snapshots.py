"""Issue 11 part 3 through the mount: `PATH/.snapshots/NAME` (docs/mount.md, "Versions and
snapshots"): reachable by name, never listed, every file its bytes as of the snapshot, read by
real programs; every change there EROFS."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator

import pytest
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_fuse()
    cluster = Cluster(tmp_path_factory.mktemp("snapshots-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def mount(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(cluster, tmp_path_factory.mktemp("snapshots") / "m", name="mount-s") as m:
        yield m


def test_a_snapshot_is_read_through_the_mount_and_refuses_every_change(
        cluster: Cluster, mount: Mount) -> None:
    d = mount / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_bytes(b"a before\n" * 1000)
    (d / "sub" / "b").write_bytes(b"b before\n")
    os.symlink("a", d / "link")
    made = cluster.dfs("snapshot", "create", "/d", "monday")
    assert made.returncode == 0, made.stderr
    (d / "a").write_bytes(b"a after\n")
    os.unlink(d / "sub" / "b")

    snap = d / ".snapshots" / "monday"
    assert ".snapshots" not in os.listdir(d)
    assert os.listdir(d / ".snapshots") == ["monday"]
    assert sorted(os.listdir(snap)) == ["a", "link", "sub"]
    assert (snap / "a").read_bytes() == b"a before\n" * 1000
    assert (snap / "sub" / "b").read_bytes() == b"b before\n"
    assert os.readlink(snap / "link") == "a"
    assert (d / "a").read_bytes() == b"a after\n"
    st = os.stat(snap / "a")
    assert st.st_mode & 0o222 == 0 and st.st_size == 9000
    copied = subprocess.run(["cp", "-r", str(snap), str(mount / "copy")], capture_output=True)
    assert copied.returncode == 0, copied.stderr
    assert (mount / "copy" / "sub" / "b").read_bytes() == b"b before\n"
    listing = subprocess.run(["ls", "-lR", str(snap)], capture_output=True)
    assert listing.returncode == 0 and b"sub" in listing.stdout

    changes = [
        lambda: open(snap / "a", "wb"),
        lambda: open(snap / "a", "r+b"),
        lambda: open(snap / "new", "wb"),
        lambda: os.unlink(snap / "a"),
        lambda: os.mkdir(snap / "x"),
        lambda: os.rename(snap / "a", d / "a2"),
        lambda: os.rename(d / "a", snap / "a"),
        lambda: os.chmod(snap / "a", 0o600),
        lambda: os.truncate(snap / "a", 0),
        lambda: os.setxattr(snap / "a", "user.x", b"1"),
        lambda: os.symlink("a", snap / "l2"),
        lambda: os.link(snap / "a", d / "hard"),
        lambda: os.rmdir(snap / "sub"),
    ]
    seen: list[int] = []
    for change in changes:
        with pytest.raises(OSError) as info:
            change()
        seen.append(info.value.errno)
    assert seen == [errno.EROFS] * len(changes), seen
    assert (snap / "a").read_bytes() == b"a before\n" * 1000
    with pytest.raises(OSError) as info:
        os.mkdir(d / ".snapshots")
    assert info.value.errno in (errno.EEXIST, errno.EINVAL)
