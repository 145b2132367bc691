"""No lost update through the mount (issue 11 §4, docs/mount.md "Conflicting writers"):
read-modify-write through two handles or two mounts of one cluster. By default the last
writer wins; with `--on-conflict fail`, or under a directory whose `user.dfs.on_conflict` is
`fail`, the second commit is refused: close()/fsync() return ESTALE, the file keeps the first
writer's content, and the mount logs one line naming the file and both versions. A lone
writer never gets a false conflict."""

from __future__ import annotations

import errno
import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse, run

pytestmark = pytest.mark.mount
TTL = 1.0  # the mounts' --attr-timeout (the default), which bounds the policy cache too
ON_CONFLICT = "user.dfs.on_conflict"
_dirs = itertools.count(1)


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def default_mounts(fuse_ok: None, shared_cluster: Cluster,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    """One mount with no option, one with the default spelled out."""
    root = tmp_path_factory.mktemp("lww")
    with mounted(shared_cluster, root / "a", name="mount-lww-a") as a, \
            mounted(shared_cluster, root / "b", name="mount-lww-b",
                    args=["--on-conflict", "overwrite"]) as b:
        yield a, b


@pytest.fixture(scope="module")
def fail_mounts(fuse_ok: None, shared_cluster: Cluster,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Mount]]:
    root = tmp_path_factory.mktemp("fail")
    with mounted(shared_cluster, root / "c", name="mount-fail-c",
                 args=["--on-conflict", "fail"]) as c, \
            mounted(shared_cluster, root / "d", name="mount-fail-d",
                    args=["--on-conflict", "fail"]) as d:
        yield c, d


def fresh_dir(mount: Mount) -> str:
    """A directory of its own for one test (the cluster is shared by the module)."""
    name = f"t{next(_dirs)}-{os.getpid()}"
    (mount / name).mkdir()
    return name


def version(path: Path) -> int:
    return int(os.getxattr(path, "user.dfs.version"))


def rmw_race(first: Path, second: Path, base: bytes = b"counter=0") -> OSError | None:
    """Two read-modify-writes of one file interleaved: both handles read the same version,
    then `first` writes and closes, then `second` does; what the second close raised."""
    first.write_bytes(base)
    f1 = open(first, "r+b")
    f2 = open(second, "r+b")
    try:
        assert f1.read() == base and f2.read() == base
        f1.seek(0)
        f1.write(b"first writer")
        f1.truncate()
        f1.close()
        f2.seek(0)
        f2.write(b"second writer!")
        f2.truncate()
        try:
            f2.close()
        except OSError as e:
            return e
        return None
    finally:
        f1.close()
        if not f2.closed:
            try:
                f2.close()
            except OSError:
                pass


def conflict_lines(mount: Mount) -> list[str]:
    return [line for line in mount.log(400).splitlines() if "conflict: " in line]


# ------------------------------------------------------------------- last writer wins


def test_default_is_last_writer_wins(default_mounts: tuple[Mount, Mount]) -> None:
    a, b = default_mounts
    d = fresh_dir(a)
    # Across mounts (the second closes on the mount with --on-conflict overwrite) ...
    assert rmw_race(a / d / "f", b / d / "f") is None
    assert (a / d / "f").read_bytes() == b"second writer!"
    # ... the other way round, and two handles of one mount.
    assert rmw_race(b / d / "g", a / d / "g") is None
    assert (b / d / "g").read_bytes() == b"second writer!"
    assert rmw_race(a / d / "h", a / d / "h") is None
    assert (a / d / "h").read_bytes() == b"second writer!"
    assert not conflict_lines(a) and not conflict_lines(b)


# --------------------------------------------------------------------- --on-conflict fail


def test_fail_refuses_the_second_commit_and_keeps_the_first(
    fail_mounts: tuple[Mount, Mount]
) -> None:
    c, d = fail_mounts
    name = fresh_dir(c)
    (c / name / "f").write_bytes(b"counter=0")
    opened = version(c / name / "f")
    error = rmw_race(c / name / "f", d / name / "f")
    assert isinstance(error, OSError) and error.errno == errno.ESTALE, error
    assert os.stat(d / name / "f").st_size == len(b"first writer")  # not the refused spool's
    # Nothing of the refused handle landed; a later open anywhere sees the first writer's.
    assert (d / name / "f").read_bytes() == b"first writer"
    assert (c / name / "f").read_bytes() == b"first writer"
    assert run("cat", d / name / "f").stdout == "first writer"
    now = version(d / name / "f")
    # One line in the refused mount's log, naming the file and both versions.
    lines = [line for line in conflict_lines(d) if f"/{name}/f " in line]
    assert len(lines) == 1, conflict_lines(d)
    assert re.search(rf"based on version {now - 1}\b.*committed version {now}\b", lines[0]), \
        lines[0]
    assert opened < now
    # Re-doing the read-modify-write from a fresh open works.
    with open(d / name / "f", "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data + b" + second")
    assert (c / name / "f").read_bytes() == b"first writer + second"


def test_fail_between_two_handles_of_one_mount(fail_mounts: tuple[Mount, Mount]) -> None:
    c, _ = fail_mounts
    name = fresh_dir(c)
    error = rmw_race(c / name / "f", c / name / "f")
    assert isinstance(error, OSError) and error.errno == errno.ESTALE, error
    assert (c / name / "f").read_bytes() == b"first writer"


def test_two_increments_to_the_same_content_still_conflict(
    fail_mounts: tuple[Mount, Mount]
) -> None:
    """The check is on versions, not content: two writers that both turn 5 into 6 are two
    updates, and the second must not pass for the first."""
    c, d = fail_mounts
    name = fresh_dir(c)
    (c / name / "n").write_bytes(b"5")
    one, two = open(c / name / "n", "r+b"), open(d / name / "n", "r+b")
    try:
        for f in (one, two):
            value = int(f.read())
            f.seek(0)
            f.write(str(value + 1).encode())
        one.close()
        with pytest.raises(OSError) as raised:
            two.close()
        assert raised.value.errno == errno.ESTALE
    finally:
        one.close()
        two.close()
    assert (d / name / "n").read_bytes() == b"6"


def test_fsync_reports_the_conflict(fail_mounts: tuple[Mount, Mount]) -> None:
    c, d = fail_mounts
    name = fresh_dir(c)
    path_c, path_d = c / name / "f", d / name / "f"
    path_c.write_bytes(b"v0")
    late = os.open(path_d, os.O_RDWR)
    try:
        assert os.read(late, 100) == b"v0"
        path_c.write_bytes(b"the other writer's")  # committed while `late` is open
        os.pwrite(late, b"late", 0)
        with pytest.raises(OSError) as raised:
            os.fsync(late)
        assert raised.value.errno == errno.ESTALE
        assert path_c.read_bytes() == b"the other writer's"
        assert os.stat(path_d).st_size == len(b"the other writer's")
        # Reported once, as a local fsync error is: nothing new to commit, close is clean;
        # but more writes on the same stale handle are refused again.
        os.pwrite(late, b"later", 0)
        with pytest.raises(OSError) as again:
            os.close(late)
        assert again.value.errno == errno.ESTALE
    finally:
        try:
            os.close(late)
        except OSError:
            pass
    assert path_d.read_bytes() == b"the other writer's"


def test_an_o_trunc_handle_is_based_on_the_version_it_truncated(
    fail_mounts: tuple[Mount, Mount]
) -> None:
    c, d = fail_mounts
    name = fresh_dir(c)
    (c / name / "f").write_bytes(b"old")
    replacing = open(d / name / "f", "wb")  # O_TRUNC
    try:
        replacing.write(b"replacement")
        (c / name / "f").write_bytes(b"committed meanwhile")
        with pytest.raises(OSError) as raised:
            replacing.close()
        assert raised.value.errno == errno.ESTALE
    finally:
        replacing.close()
    assert (d / name / "f").read_bytes() == b"committed meanwhile"


def test_a_file_created_by_one_handle_and_committed_by_another(
    fail_mounts: tuple[Mount, Mount]
) -> None:
    """"The version it opened" for a creating handle is the new empty file: it conflicts only
    when another writer committed the file in between. Nobody else sees the new file before
    its first commit; a second creator of the name (no O_EXCL) opens the same one."""
    c, d = fail_mounts
    name = fresh_dir(c)
    creator = open(c / name / "new", "xb")
    try:
        creator.write(b"creator's")
        with pytest.raises(FileNotFoundError):
            open(d / name / "new", "r+b")  # not written yet: not there for others
        with open(d / name / "new", "wb") as other:  # O_CREAT: the file creator made
            other.write(b"other's")
        with pytest.raises(OSError) as raised:
            creator.close()
        assert raised.value.errno == errno.ESTALE
    finally:
        creator.close()
    assert (c / name / "new").read_bytes() == b"other's"
    # A creating handle nobody raced commits as usual.
    (c / name / "alone").write_bytes(b"alone")
    assert (d / name / "alone").read_bytes() == b"alone"


def test_a_lone_writer_never_gets_a_false_conflict(fail_mounts: tuple[Mount, Mount]) -> None:
    c, d = fail_mounts
    name = fresh_dir(c)
    path = c / name / "f"
    # write, fsync, write again, fsync, close: one handle, each commit based on its last.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"one")
    os.fsync(fd)
    os.write(fd, b" two")
    os.fsync(fd)
    os.write(fd, b" three")
    os.close(fd)
    assert path.read_bytes() == b"one two three"
    # O_TRUNC rewrites, appends, in-place updates, by real programs.
    run("sh", "-c", f"echo truncated > '{path}'")
    run("sh", "-c", f"echo appended >> '{path}'")
    run("sh", "-c", f"printf T | dd of='{path}' bs=1 conv=notrunc status=none")
    assert path.read_bytes() == b"Truncated\nappended\n"
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data.upper())
    assert path.read_bytes() == b"TRUNCATED\nAPPENDED\n"
    # Rename over: write a temp file, rename it over (sed -i, editors), then update in place.
    run("sed", "-i", "s/APPENDED/renamed over/", path)
    assert path.read_bytes() == b"TRUNCATED\nrenamed over\n"
    (c / name / "tmp").write_bytes(b"replaced")
    os.rename(c / name / "tmp", path)
    with open(path, "ab") as f:
        f.write(b" and appended")
    # truncate through the handle, then write: still one writer.
    with open(path, "r+b") as f:
        f.truncate(3)
        f.seek(0, os.SEEK_END)
        f.write(b"!")
    assert (d / name / "f").read_bytes() == b"rep!"
    assert not [line for line in conflict_lines(c) if f"/{name}/" in line]


# ------------------------------------------------------------ per directory: the xattr


def test_directory_xattr_applies_to_its_subtree_only(default_mounts: tuple[Mount, Mount]) -> None:
    a, b = default_mounts
    name = fresh_dir(a)
    top = a / name
    (top / "a" / "b").mkdir(parents=True)
    (top / "c").mkdir()
    run("setfattr", "-n", ON_CONFLICT, "-v", "fail", top / "a")
    assert run("getfattr", "--only-values", "-n", ON_CONFLICT, top / "a").stdout == "fail"
    assert ON_CONFLICT in os.listxattr(top / "a")  # a real xattr: cp -a and rsync -X keep it
    time.sleep(TTL + 0.2)  # the other mount's policy cache
    # /a/b/f inherits fail from /a, on both mounts; /c/f keeps the mount's default.
    error = rmw_race(top / "a" / "b" / "f", b / name / "a" / "b" / "f")
    assert isinstance(error, OSError) and error.errno == errno.ESTALE, error
    assert (top / "a" / "b" / "f").read_bytes() == b"first writer"
    error = rmw_race(b / name / "a" / "g", top / "a" / "g")
    assert isinstance(error, OSError) and error.errno == errno.ESTALE, error
    assert rmw_race(top / "c" / "f", b / name / "c" / "f") is None
    assert (top / "c" / "f").read_bytes() == b"second writer!"
    # The nearest ancestor wins: /a/b says overwrite again.
    os.setxattr(top / "a" / "b", ON_CONFLICT, b"overwrite")
    assert rmw_race(b / name / "a" / "b" / "h", top / "a" / "b" / "h") is None
    # Removing it here is seen here at once.
    os.removexattr(top / "a", ON_CONFLICT)
    assert rmw_race(b / name / "a" / "i", top / "a" / "i") is None
    assert (top / "a" / "i").read_bytes() == b"second writer!"


def test_directory_xattr_overwrite_under_a_fail_mount(fail_mounts: tuple[Mount, Mount]) -> None:
    c, d = fail_mounts
    name = fresh_dir(c)
    (c / name / "scratch" / "deep").mkdir(parents=True)
    os.setxattr(c / name / "scratch", ON_CONFLICT, b"overwrite")
    assert rmw_race(c / name / "scratch" / "deep" / "f", c / name / "scratch" / "deep" / "f") \
        is None
    assert (d / name / "scratch" / "deep" / "f").read_bytes() == b"second writer!"


def test_the_xattr_takes_only_its_values_and_only_on_directories(
    default_mounts: tuple[Mount, Mount]
) -> None:
    a, _ = default_mounts
    name = fresh_dir(a)
    (a / name / "f").write_bytes(b"x")
    for path, value in ((a / name, b"sometimes"), (a / name / "f", b"fail")):
        with pytest.raises(OSError) as raised:
            os.setxattr(path, ON_CONFLICT, value)
        assert raised.value.errno == errno.EINVAL
    with pytest.raises(OSError) as reserved:  # the rest of user.dfs.* stays dfs's own
        os.setxattr(a / name, "user.dfs.other", b"1")
    assert reserved.value.errno == errno.EPERM
    with pytest.raises(OSError) as virtual:
        os.setxattr(a / name / "f", "user.dfs.version", b"9")
    assert virtual.value.errno == errno.EPERM
    assert b"getxattr_inherited=" in os.getxattr(a, "user.dfs.calls")  # still answered


def test_the_policy_costs_at_most_one_round_trip_per_directory_and_timeout(
    fail_mounts: tuple[Mount, Mount]
) -> None:
    c, _ = fail_mounts
    name = fresh_dir(c)
    deep = c / name / "1" / "2" / "3" / "4" / "5" / "6" / "7" / "8"
    deep.mkdir(parents=True)

    def lookups() -> int:
        calls = dict(kv.split("=") for kv in os.getxattr(c, "user.dfs.calls").decode().split(","))
        return int(calls.get("getxattr_inherited", 0))

    before = lookups()
    started = time.monotonic()
    for i in range(20):
        (deep / f"f{i}").write_bytes(b"x" * i)
    elapsed = time.monotonic() - started
    # One inherited lookup for the deep directory (two if the timeout ran out meanwhile),
    # however deep it is; read-only opens and closes never look.
    assert lookups() - before <= 1 + int(elapsed / TTL), (lookups() - before, elapsed)
    before = lookups()
    for i in range(20):
        assert (deep / f"f{i}").read_bytes() == b"x" * i
    assert lookups() == before
