"""A new file appears with its content (docs/design.md §6): created through one mount, it is
not there for another until its writer's commit, and then it is there whole. Its name stays
taken while its creator lives and renews it, and is given up once a dead creator's lease has
run out (dfs/unwritten.py), so `tar -x` and `mkdir` work again after a mount was killed."""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from mount_harness import Mount, mount_cluster, run, two_mounts

pytestmark = pytest.mark.mount
LEASE_S = 4.0  # renewed every second: a busy machine may delay a renewal by seconds
TTL_S = 1.0  # the mounts' --attr-timeout (the default): how long a negative lookup is cached


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with mount_cluster(tmp_path_factory.mktemp("unwritten-cluster"),
                       "--unwritten-lease", str(LEASE_S)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mounts(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Mount, Mount]]:
    with two_mounts(cluster, tmp_path_factory.mktemp("unwritten")) as both:
        yield both


def test_a_file_being_written_is_not_there_for_others_until_its_close(
        mounts: tuple[Mount, Mount], cluster: Cluster) -> None:
    m1, m2 = mounts
    with open(m1 / "growing", "wb") as f:
        f.write(b"first half, ")
        f.flush()
        assert os.path.exists(m1 / "growing")  # its own mount sees it
        assert not os.path.exists(m2 / "growing")
        assert "growing" not in os.listdir(m2.path)
        assert cluster.dfs("cat", "/growing").returncode == 1
        f.write(b"second half")
    time.sleep(TTL_S * 1.5)  # m2's negative lookup expires
    assert (m2 / "growing").read_bytes() == b"first half, second half"
    # touch: no write at all is still a finished (empty) first content.
    run("touch", m1 / "touched")
    time.sleep(TTL_S * 1.5)
    assert (m2 / "touched").read_bytes() == b""


def test_a_live_creator_keeps_the_name_past_the_lease(mounts: tuple[Mount, Mount]) -> None:
    """O_EXCL lock files: the mount renews its unwritten files, so nobody takes the name."""
    m1, m2 = mounts
    with open(m1 / "lock", "xb"):
        time.sleep(LEASE_S * 1.5)
        with pytest.raises(FileExistsError):
            os.open(m2 / "lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with pytest.raises(OSError) as raised:
            os.mkdir(m2 / "lock")
        assert raised.value.errno == errno.EEXIST


def test_a_killed_creator_gives_its_name_up_after_the_lease(
        mounts: tuple[Mount, Mount], cluster: Cluster, tmp_path: Path) -> None:
    """A mount killed while it created files leaves them hidden; once their lease has run
    out, `tar -x` (O_EXCL creates) and mkdir take the names again."""
    _, m2 = mounts
    m3 = Mount(cluster, tmp_path / "m3", name="m3-killed").start()
    try:
        held = [open(m3 / name, "wb") for name in ("t1", "t2")]
        for f in held:
            f.write(b"never finished")
            f.flush()
        m3.kill()
        for f in held:
            with contextlib.suppress(OSError):  # the mount is gone under it
                f.close()
    finally:
        m3.stop()
    source = tmp_path / "src"
    source.mkdir()
    (source / "t1").write_bytes(b"from the archive")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source / "t1", arcname="t1")
    deadline = time.monotonic() + LEASE_S + 30  # slack for a busy machine
    while True:
        result = run("tar", "-xf", archive, "-C", m2.path, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 0, result.stderr
    assert (m2 / "t1").read_bytes() == b"from the archive"
    os.mkdir(m2 / "t2")  # the other abandoned name, taken by a directory
    assert (m2 / "t2").is_dir()
    assert "unwritten inode" in cluster.log("coordinator", 400)
