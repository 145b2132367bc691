"""Shared mappings on a `dfs mount --page-cache` (docs/mount.md, "Page cache"): MAP_SHARED
writes reach the file and commit at msync or close like write(2); a mapping, and the kernel page
cache behind it, shows one whole version while another mount commits new ones. Without the
option every open is direct_io, and a shared mapping is ENODEV as it always was."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

import pytest
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse

from dfs.chunks import CHUNK_SIZE

pytestmark = pytest.mark.mount
PAGE = mmap.PAGESIZE
PAGE_CACHE = ["--page-cache"]


@pytest.fixture(scope="module")
def two_mounts(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Mount, Mount]]:
    require_fuse()
    root = tmp_path_factory.mktemp("mmap")
    with mounted(shared_cluster, root / "a", name="mmap-a", args=PAGE_CACHE) as a, \
            mounted(shared_cluster, root / "b", name="mmap-b", args=PAGE_CACHE) as b:
        yield a, b


@pytest.fixture(scope="module")
def default_mount(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Mount]:
    require_fuse()
    with mounted(shared_cluster, tmp_path_factory.mktemp("mmap") / "d", name="mmap-d") as m:
        yield m


def committed(cluster: Cluster, name: str) -> bytes:
    """The file's committed content, read by the CLI straight from the cluster."""
    return cluster.dfs("cat", f"/{name}").stdout  # type: ignore[no-any-return]


def test_shared_mapping_writes_commit_at_msync_and_close(
    two_mounts: tuple[Mount, Mount], shared_cluster: Cluster
) -> None:
    a, b = two_mounts
    old = os.urandom(CHUNK_SIZE + 3 * PAGE + 123)  # two chunks, a partial last page
    (a / "mapped").write_bytes(old)
    fd = os.open(a / "mapped", os.O_RDWR)
    try:
        with mmap.mmap(fd, len(old), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:] == old
            m[10:20] = b"0123456789"
            m[CHUNK_SIZE : CHUNK_SIZE + 5] = b"HELLO"
            m[-3:] = b"end"
            m.flush()  # msync(MS_SYNC) is an fsync: it commits
            first = bytearray(old)
            first[10:20] = b"0123456789"
            first[CHUNK_SIZE : CHUNK_SIZE + 5] = b"HELLO"
            first[-3:] = b"end"
            assert committed(shared_cluster, "mapped") == bytes(first)
            assert (b / "mapped").read_bytes() == bytes(first)
            m[0:4] = b"LAST"  # no msync: munmap and close write it back, close commits
        assert os.pread(fd, 4, 0) == b"LAST"
    finally:
        os.close(fd)
    first[0:4] = b"LAST"
    assert committed(shared_cluster, "mapped") == bytes(first)
    assert (b / "mapped").read_bytes() == bytes(first)
    assert (a / "mapped").read_bytes() == bytes(first)


def test_mapping_a_new_file_after_ftruncate(
    two_mounts: tuple[Mount, Mount], shared_cluster: Cluster
) -> None:
    a, b = two_mounts
    size = 5 * PAGE + 77
    fd = os.open(a / "fresh", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        for page in range(0, size, PAGE):
            m[page : page + 8] = page.to_bytes(8, "big")
        m.close()  # unmapped before close: munmap writes the pages back
    finally:
        os.close(fd)
    want = bytearray(size)
    for page in range(0, size, PAGE):
        want[page : page + 8] = page.to_bytes(8, "big")
    assert os.stat(b / "fresh").st_size == size
    assert (b / "fresh").read_bytes() == bytes(want)
    assert committed(shared_cluster, "fresh") == bytes(want)


def test_mapping_keeps_one_version_while_another_mount_commits(
    two_mounts: tuple[Mount, Mount]
) -> None:
    a, b = two_mounts
    v1 = os.urandom(CHUNK_SIZE + 5 * PAGE + 11)
    (a / "versions").write_bytes(v1)
    fd = os.open(a / "versions", os.O_RDONLY)
    try:
        with mmap.mmap(fd, len(v1), mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[: len(v1) // 2] == v1[: len(v1) // 2]
            newer = [os.urandom(n) for n in (3 * PAGE, CHUNK_SIZE * 2 + 1, len(v1))]
            for content in newer:
                (b / "versions").write_bytes(content)
                # A new open on this mount reads the new version whole (direct_io), even
                # while the kernel's pages of the inode are the mapped one's.
                assert (a / "versions").read_bytes() == content
                assert m[:] == v1
                assert os.pread(fd, len(v1) + 10, 0) == v1
                # Dropped pages fault back in from the mapped handle's own version.
                m.madvise(mmap.MADV_DONTNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert m[:] == v1
            assert os.fstat(fd).st_size == len(v1)
    finally:
        os.close(fd)
    # Closed: the next open is of the newest version, and the old pages are gone.
    assert (a / "versions").read_bytes() == newer[-1]
    with open(a / "versions", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == newer[-1]


def test_reopen_never_serves_pages_of_an_older_version(two_mounts: tuple[Mount, Mount]) -> None:
    """Same size and mtime, so only the version says the kernel's pages are stale."""
    a, b = two_mounts
    (b / "same").write_bytes(b"a" * (3 * PAGE))
    st = os.stat(b / "same")
    assert (a / "same").read_bytes() == b"a" * (3 * PAGE)  # cached in mount A's kernel
    (b / "same").write_bytes(b"b" * (3 * PAGE))
    os.utime(b / "same", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a / "same").read_bytes() == b"b" * (3 * PAGE)
    with open(a / "same", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == b"b" * (3 * PAGE)


def test_write_then_read_back_through_the_page_cache(two_mounts: tuple[Mount, Mount]) -> None:
    """A lone writer's pages are its spool; after its commit they are that version's."""
    a, b = two_mounts
    data = os.urandom(2 * CHUNK_SIZE + 999)
    with open(a / "written", "wb") as f:
        f.write(data)
        f.seek(100)
        f.write(b"patched")
    want = data[:100] + b"patched" + data[107:]
    assert (a / "written").read_bytes() == want
    assert (b / "written").read_bytes() == want
    with open(a / "written", "r+b") as f:
        f.truncate(50)
    assert (a / "written").read_bytes() == want[:50]
    assert (b / "written").read_bytes() == want[:50]


def test_append_after_another_mount_grew_the_file(two_mounts: tuple[Mount, Mount]) -> None:
    """The kernel's size here is the old version's when the append opens."""
    a, b = two_mounts
    (a / "log").write_bytes(b"one\n")
    assert (a / "log").read_bytes() == b"one\n"
    (b / "log").write_bytes(b"one\ntwo, from the other mount\n")
    with open(a / "log", "ab") as f:
        f.write(b"three\n")
    want = b"one\ntwo, from the other mount\nthree\n"
    assert (a / "log").read_bytes() == want
    assert os.stat(a / "log").st_size == len(want)
    assert (b / "log").read_bytes() == want


def test_close_commits_what_a_live_mapping_wrote(
    two_mounts: tuple[Mount, Mount], shared_cluster: Cluster
) -> None:
    """The writer's last close writes a shared mapping's dirty pages back before it commits;
    a close while the writer still holds a descriptor on the file commits nothing
    (docs/design.md §7, "Which close commits"). Python's mmap keeps a dup of the fd, so the
    close of `fd` is not the writer's end: closing the mapping is."""
    a, b = two_mounts
    (a / "live").write_bytes(b"." * (2 * PAGE))
    fd = os.open(a / "live", os.O_RDWR)
    m = mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        m[PAGE : PAGE + 4] = b"live"
        os.close(fd)  # the mapping's own descriptor stays: this is only a flush
        assert committed(shared_cluster, "live") == b"." * (2 * PAGE)
    finally:
        m.close()  # the last descriptor: the writer's end
    want = b"." * PAGE + b"live" + b"." * (PAGE - 4)
    assert committed(shared_cluster, "live") == want
    assert (b / "live").read_bytes() == want


def test_without_the_option_a_shared_writable_mapping_is_enodev(
    default_mount: Mount, shared_cluster: Cluster
) -> None:
    """The default is unchanged: every open is direct_io, so MAP_SHARED fails as before,
    and the file keeps what write(2) put there."""
    (default_mount / "plain").write_bytes(b"x" * (2 * PAGE))
    fd = os.open(default_mount / "plain", os.O_RDWR)
    try:
        with pytest.raises(OSError) as raised:
            mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert raised.value.errno == errno.ENODEV
        os.pwrite(fd, b"still", 0)
    finally:
        os.close(fd)
    assert committed(shared_cluster, "plain") == b"still" + b"x" * (2 * PAGE - 5)


def _touch_in_child(m: mmap.mmap, want: bytes) -> str:
    """Read the whole mapping in a forked child: a SIGBUS there must not kill the test."""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if m[:] == want else 1)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return "same" if os.WEXITSTATUS(status) == 0 else "different"


def test_a_mapping_survives_a_truncating_writer_on_the_same_mount(
    two_mounts: tuple[Mount, Mount]
) -> None:
    """The kernel sets i_size to 0 after an O_TRUNC open (atomic_o_trunc); the mount stores
    the mapped version's size back, at the latest by the writer's first request."""
    a, b = two_mounts
    old = os.urandom(3 * PAGE + 5)
    (a / "truncated").write_bytes(old)
    fd = os.open(a / "truncated", os.O_RDONLY)
    try:
        with mmap.mmap(fd, len(old), mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == old
            # os.open, not open(): Python's open() fstats, which would refresh the size too.
            w = os.open(a / "truncated", os.O_WRONLY | os.O_TRUNC)
            try:
                assert os.write(w, b"new") == 3
                assert _touch_in_child(m, old) == "same"
                assert os.pread(fd, len(old) + 10, 0) == old
            finally:
                os.close(w)
            assert _touch_in_child(m, old) == "same"
            assert (b / "truncated").read_bytes() == b"new"
    finally:
        os.close(fd)
    assert (a / "truncated").read_bytes() == b"new"
