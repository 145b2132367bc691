"""The mount as one client among several, and through failures (docs/design.md §7, §8, §9):
concurrent writers never mix, two mounts see each other's closed files within the attribute
timeout, everything persists across a full restart, the mount rides out a coordinator restart
and a lost node, a failed commit is EIO at close and leaves the previous version."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import COORDINATOR, Cluster
from mount_harness import Mount, mounted, require_fuse, tree_listing
from standby_helpers import standby_thread

from dfs.chunks import CHUNK_SIZE

pytestmark = pytest.mark.mount
TTL = 1.0  # the mounts' --attr-timeout (the default)


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def two_mounts(fuse_ok: None, shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Mount, Mount]]:
    root = tmp_path_factory.mktemp("two")
    with mounted(shared_cluster, root / "a", name="mount-a") as a, \
            mounted(shared_cluster, root / "b", name="mount-b") as b:
        yield a, b


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_concurrent_writers_never_mix(two_mounts: tuple[Mount, Mount]) -> None:
    a, b = two_mounts
    contents = {
        "initial": b"0" * 1000,
        "w1": os.urandom(2 * CHUNK_SIZE + 777),  # different sizes, so a mix shows in length too
        "w2": os.urandom(CHUNK_SIZE // 2 + 3),
        "w3": os.urandom(CHUNK_SIZE + 1),
    }
    known = {digest(c): name for name, c in contents.items()}
    (a / "contended").write_bytes(contents["initial"])
    stop = threading.Event()
    errors: list[str] = []
    seen: dict[str, int] = {}

    def writer(path: Path, content: bytes) -> None:
        try:
            while not stop.is_set():
                with open(path, "wb") as f:  # several writes per commit, with pauses
                    for start in range(0, len(content), 300_000):
                        f.write(content[start : start + 300_000])
                        time.sleep(0.002)
        except OSError as e:
            errors.append(f"writer: {e}")

    def reader(path: Path) -> None:
        try:
            while not stop.is_set():
                with open(path, "rb") as f:
                    parts = []
                    while chunk := f.read(100_000):
                        parts.append(chunk)
                        time.sleep(0.001)
                name = known.get(digest(b"".join(parts)))
                if name is None:
                    errors.append(f"reader saw a mix of {len(b''.join(parts))} bytes")
                else:
                    seen[name] = seen.get(name, 0) + 1
        except OSError as e:
            errors.append(f"reader: {e}")

    threads = [
        threading.Thread(target=writer, args=(a / "contended", contents["w1"])),
        threading.Thread(target=writer, args=(b / "contended", contents["w2"])),
        threading.Thread(target=writer, args=(a / "contended", contents["w3"])),  # same mount
        threading.Thread(target=reader, args=(a / "contended",)),
        threading.Thread(target=reader, args=(b / "contended",)),
    ]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert sum(seen.values()) >= 10
    assert len(seen) >= 2, seen  # the readers did see more than one writer's version
    final = (b / "contended").read_bytes()
    assert digest(final) in known


def test_two_mounts_see_each_others_writes(two_mounts: tuple[Mount, Mount]) -> None:
    a, b = two_mounts
    (a / "shared").mkdir()
    (a / "shared" / "f").write_bytes(b"version one")
    assert (b / "shared" / "f").read_bytes() == b"version one"  # B now caches its attributes
    (a / "shared" / "f").write_bytes(b"version two, longer")
    (a / "shared" / "new").write_bytes(b"new file")
    (a / "shared" / "sub").mkdir()
    written = time.monotonic()

    def b_sees_everything() -> bool:
        try:
            return (
                (b / "shared" / "f").read_bytes() == b"version two, longer"
                and os.stat(b / "shared" / "f").st_size == len(b"version two, longer")
                and sorted(os.listdir(b / "shared")) == ["f", "new", "sub"]
                and (b / "shared" / "new").read_bytes() == b"new file"
            )
        except FileNotFoundError:
            return False

    while not b_sees_everything():
        assert time.monotonic() - written < TTL + 2.0, "mount B still sees stale state"
        time.sleep(0.05)
    # And back: B removes and renames, A sees it.
    os.unlink(b / "shared" / "new")
    os.rename(b / "shared" / "f", b / "shared" / "sub" / "g")
    changed = time.monotonic()
    while sorted(os.listdir(a / "shared")) != ["sub"] or not (a / "shared" / "sub" / "g").exists():
        assert time.monotonic() - changed < TTL + 2.0, "mount A still sees stale state"
        time.sleep(0.05)
    assert (a / "shared" / "sub" / "g").read_bytes() == b"version two, longer"


# ------------------------------------------------------------------ restarts and failures


def populate(root: Path) -> dict[str, object]:
    """Files with every kind of metadata; what must come back after a restart."""
    (root / "dir" / "deeper").mkdir(parents=True)
    (root / "dir" / "deeper" / "big").write_bytes(os.urandom(2 * CHUNK_SIZE + 5))
    (root / "dir" / "small").write_text("small file")
    (root / "empty").write_bytes(b"")
    os.chmod(root / "dir" / "small", 0o640)
    os.chmod(root / "dir" / "deeper", 0o750)
    os.chown(root / "dir" / "small", 1001, 1002)
    os.utime(root / "dir" / "small", ns=(1_500_000_000_000_000_001, 1_600_000_000_000_000_002))
    os.symlink("dir/small", root / "link")
    os.link(root / "dir" / "small", root / "hardlink")
    os.setxattr(root / "dir" / "small", "user.color", b"blue")
    os.setxattr(root / "dir", "user.kind", b"directory")
    return snapshot(root)


def snapshot(root: Path) -> dict[str, object]:
    contents = {
        str(p.relative_to(root)): digest(p.read_bytes())
        for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    }
    xattrs = {
        str(p.relative_to(root)): sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))
        for p in sorted(root.rglob("*")) if not p.is_symlink()
    }
    mtimes = {str(p.relative_to(root)): os.lstat(p).st_mtime_ns for p in sorted(root.rglob("*"))
              if p.is_file()}
    return {"tree": tree_listing(root), "contents": contents, "xattrs": xattrs,
            "mtimes": mtimes, "nlink": os.stat(root / "hardlink").st_nlink}


def test_everything_persists_across_a_full_restart(
    fuse_ok: None, cluster: Cluster, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    with mounted(cluster, tmp_path / "m1") as m:
        before = populate(m.path)
    cluster.stop_all()
    cluster.restart(COORDINATOR, wait=False)
    for name in cluster.node_names:
        cluster.restart(name, wait=False)
    cluster.wait_nodes_up()
    with mounted(cluster, tmp_path / "m2", name="mount-2") as m:
        assert snapshot(m.path) == before


def test_rides_out_coordinator_restart_and_fails_cleanly(
    fuse_ok: None, cluster: Cluster, tmp_path: Path
) -> None:
    with mounted(cluster, tmp_path / "m", args=["--retry-timeout", "20"]) as m:
        (m / "before").write_bytes(b"old version")
        cluster.kill(COORDINATOR)
        results: dict[str, object] = {}

        def work() -> None:  # blocks until the coordinator is back, then succeeds
            try:
                (m / "during-dir").mkdir()
                (m / "during").write_bytes(b"written while the coordinator restarted")
                (m / "before").write_bytes(b"new version")
                results["listing"] = sorted(os.listdir(m.path))
            except OSError as e:
                results["error"] = e

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(1.5)
        cluster.restart(COORDINATOR)
        worker.join(60)
        assert "error" not in results, results
        assert results["listing"] == ["before", "during", "during-dir"]
        assert (m / "during").read_bytes() == b"written while the coordinator restarted"
        assert (m / "before").read_bytes() == b"new version"


def test_rides_out_a_leader_moving_to_another_address(fuse_ok: None, tmp_path: Path) -> None:
    """Mounted with [A, standby]: A dies holding a commit (before its decision), and the same
    metadata is led from another address, which the standby names. The write in flight is
    settled there (aborted), written again, and closes without EIO; later calls follow too."""
    cluster = Cluster(tmp_path / "ha")
    with standby_thread(cluster.secret) as s:
        cluster.standbys = [s.address]
        try:
            cluster.start()
            s.leader.address = cluster.coordinator
            with mounted(cluster, tmp_path / "m", args=["--retry-timeout", "20"]) as m:
                (m / "f").write_bytes(b"old version")
                cluster.restart(COORDINATOR, env={
                    "DFS_FAILPOINTS": "coordinator.before_decision=crash"})
                old = s.leader.address = cluster.coordinator
                results: dict[str, object] = {}

                def work() -> None:
                    try:
                        (m / "f").write_bytes(b"new version, committed at the new leader")
                        (m / "d").mkdir()
                        results["listing"] = sorted(os.listdir(m.path))
                    except OSError as e:
                        results["error"] = e

                worker = threading.Thread(target=work)
                worker.start()
                cluster.wait_until(lambda: not cluster.running(COORDINATOR), timeout=20)
                s.leader.address = None  # an election runs
                cluster.restart(COORDINATOR, env={}, wait=False, listen="127.0.0.1:0")
                s.leader.address = cluster.coordinator
                assert cluster.coordinator != old
                worker.join(60)
                assert "error" not in results, f"{results}\n{m.log()}"
                assert results["listing"] == ["d", "f"]
                assert (m / "f").read_bytes() == b"new version, committed at the new leader"
        finally:
            cluster.stop_all()


def test_failed_commit_is_eio_and_keeps_the_previous_version(
    fuse_ok: None, cluster: Cluster, tmp_path: Path
) -> None:
    with mounted(cluster, tmp_path / "m", args=["--retry-timeout", "2"]) as m:
        (m / "f").write_bytes(b"the committed version")
        for name in cluster.node_names:
            cluster.kill(name)
        # What this host committed is in its read cache: readable with every node down.
        assert (m / "f").read_bytes() == b"the committed version"
        started = time.monotonic()
        f = open(m / "f", "wb")
        f.write(b"an uncommitted version, longer than before")
        f.flush()  # the write lands in the spool and succeeds
        with pytest.raises(OSError) as failure:
            f.close()  # the commit happens here
        assert failure.value.errno == errno.EIO
        assert time.monotonic() - started < 60
        # In place, without O_TRUNC: the base comes from the read cache, the commit fails.
        fd = os.open(m / "f", os.O_WRONLY)
        os.write(fd, b"X")
        with pytest.raises(OSError) as failure:
            os.close(fd)
        assert failure.value.errno == errno.EIO
        for name in cluster.node_names:
            cluster.restart(name, wait=False)
        cluster.wait_nodes_up()
        assert (m / "f").read_bytes() == b"the committed version"
        (m / "f").write_bytes(b"works again")
        assert (m / "f").read_bytes() == b"works again"


def test_reads_fail_over_when_a_node_dies(fuse_ok: None, cluster_factory, tmp_path: Path
                                          ) -> None:
    cluster = cluster_factory(nodes=4, replicas=3)
    with mounted(cluster, tmp_path / "m") as writer:
        content = os.urandom(3 * CHUNK_SIZE + 17)
        (writer / "f").write_bytes(content)
        replicas = [int(r) for r in os.getxattr(writer / "f", "user.dfs.replicas").split(b",")]
    cluster.kill(cluster.node_name(replicas[0]))
    # A fresh mount (empty cache) must read every byte from the surviving replicas.
    with mounted(cluster, tmp_path / "m2", name="mount-2") as reader:
        assert (reader / "f").read_bytes() == content
        (reader / "after").write_bytes(b"writes go to the live nodes")
        assert (reader / "after").read_bytes() == b"writes go to the live nodes"


@pytest.mark.parametrize("size_mib", [256, pytest.param(1024, marks=pytest.mark.slow)])
def test_memory_stays_bounded_for_a_big_file(
    fuse_ok: None, two_mounts: tuple[Mount, Mount], size_mib: int
) -> None:
    """The spool and the read cache are on disk: RSS stays far below the file's size."""
    a, _ = two_mounts
    block = os.urandom(CHUNK_SIZE)
    want = hashlib.sha256()
    with open(a / "big", "wb") as f:
        for i in range(size_mib):
            data = block[i % 7 :] + block[: i % 7]
            want.update(data)
            f.write(data)
    got = hashlib.sha256()
    with open(a / "big", "rb") as f:
        while data := f.read(CHUNK_SIZE):
            got.update(data)
    assert got.hexdigest() == want.hexdigest()
    status = Path(f"/proc/{a.pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines()
                        if line.startswith("VmHWM")).split()[1])
    assert peak_kib < 200 * 1024, f"mount peak RSS {peak_kib // 1024} MiB"


def test_sigterm_lets_writers_finish_and_drops_what_is_unfinished(
    fuse_ok: None, shared_cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM (what systemctl stop sends) commits no write still open: the mount serves on
    for --stop-timeout while open files hold writes, a writer that closes meanwhile commits,
    and what is still open then is dropped and logged; the files keep their last finished
    versions, and a new file that never got content is not there (docs/design.md §7,
    "Stopping")."""
    (tmp_path / "seed").write_bytes(b"old")
    assert shared_cluster.dfs("put", tmp_path / "seed", "/term-old").returncode == 0
    mount = Mount(shared_cluster, tmp_path / "m", name="mount-term",
                  args=["--stop-timeout", "5"]).start()
    try:
        finishing = open(mount / "term-finishing", "wb")
        finishing.write(b"finished in time")
        held_new = open(mount / "term-new", "wb")
        held_new.write(b"written, never closed")
        held_old = open(mount / "term-old", "r+b")
        held_old.write(b"half")
        for f in (finishing, held_new, held_old):
            f.flush()  # to the mount (Python's buffer), not a close
        assert mount.child is not None and mount.child.proc is not None
        mount.child.kill(signal.SIGTERM)
        time.sleep(0.2)
        assert mount.child.proc.poll() is None, "stopped while a writer could still finish"
        finishing.close()  # within the stop timeout: commits
        assert mount.child.proc.wait(30) == 0
        assert not os.path.ismount(mount.path)
        for f in (held_new, held_old):
            with contextlib.suppress(OSError):  # the mount is gone under it
                f.close()
        log = mount.log(80)
    finally:
        mount.stop()
    assert "dropped the uncommitted writes to /term-old" in log, log
    assert "dropped the uncommitted writes to /term-new" in log, log
    assert shared_cluster.dfs("cat", "/term-finishing").stdout == b"finished in time"
    assert shared_cluster.dfs("cat", "/term-old").stdout == b"old"
    missing = shared_cluster.dfs("cat", "/term-new")
    assert missing.returncode == 1 and b"term-new" in missing.stderr, missing


def test_bench_compares_the_mount_with_another_dir_and_names_it(
        two_mounts: tuple[Mount, Mount], shared_cluster: Cluster, tmp_path: Path) -> None:
    """`dfs bench --mount M --compare DIR` runs the same file benchmarks in DIR (a peer file
    system's mount, or local disk) in the same run and names DIR, not "local disk"."""
    import json

    mount, _ = two_mounts
    other = tmp_path / "peer-fs"
    other.mkdir()
    small = ("--size-mib", "1", "--small", "5", "--files", "5", "--listing", "10",
             "--tar-files", "5")
    table = shared_cluster.dfs("bench", "--mount", mount.path, "--compare", other, *small,
                               env={"COLUMNS": "400"}, timeout=300)  # no folded headers
    assert table.returncode == 0, table.stderr
    assert str(other) in table.stdout.decode() and "local disk" not in table.stdout.decode()
    doc = json.loads(shared_cluster.dfs("bench", "--mount", mount.path, "--compare", other,
                                        *small, "--json", timeout=300).stdout)
    assert doc["compare"]["dir"] == str(other)
    names = [m["name"] for m in doc["mount"]]
    assert names == [m["name"] for m in doc["compare"]["results"]] and set(doc["ratio"]) <= set(names)
