"""Through a directory: the same operations on a dfs mount and on local disk, side by side.

Plain blocking file I/O from worker threads (the syscalls release the GIL): this is a client
of the file system like any program, not part of a trio server.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dfs.bench import Measure

MiB = 1024 * 1024


def _write_file(path: Path, size: int, block: bytes) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _drop_cache(path: Path) -> None:
    """Drop the kernel's pages of this file, so the read that follows is a cold one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_file(path: Path) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            total += len(chunk)
    return total


def sequential(root: Path, size_mib: int) -> list[Measure]:
    path = root / "seq"
    size = size_mib * MiB
    start = time.perf_counter()
    _write_file(path, size, os.urandom(MiB))
    took = time.perf_counter() - start
    write = Measure(f"sequential write {size_mib} MiB (fsync)", size / took / 1e6, "MB/s", took)
    _drop_cache(path)
    start = time.perf_counter()
    _read_file(path)
    took = time.perf_counter() - start
    read = Measure(f"sequential read {size_mib} MiB (cold)", size / took / 1e6, "MB/s", took)
    path.unlink()
    return [write, read]


def small_files(root: Path, count: int, writers: int) -> Measure:
    d = root / f"small-{writers}"
    d.mkdir()
    payload = os.urandom(4096)

    def write(i: int) -> None:
        with open(d / f"f{i}", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(count)))
    took = time.perf_counter() - start
    shutil.rmtree(d)
    return Measure(f"4 KiB files written+fsync'd, {writers} writer{'s' if writers > 1 else ''}",
                   count / took, "files/s", took)


def create_files(root: Path, count: int) -> Measure:
    d = root / "create"
    d.mkdir()
    payload = os.urandom(4096)
    start = time.perf_counter()
    for i in range(count):
        (d / f"f{i}").write_bytes(payload)
    took = time.perf_counter() - start
    shutil.rmtree(d)
    return Measure(f"create {count} 4 KiB files", count / took, "files/s", took)


def list_and_stat(root: Path, count: int) -> Measure:
    """`ls -l` of a directory of `count` entries: listdir, then stat each."""
    d = root / "listing"
    d.mkdir()
    for i in range(count):
        (d / f"e{i:05d}").touch()
    start = time.perf_counter()
    result = subprocess.run(["ls", "-l", str(d)], capture_output=True, check=True)
    took = time.perf_counter() - start
    assert result.stdout.count(b"\n") == count + 1
    shutil.rmtree(d)
    return Measure(f"ls -l of {count} entries", count / took, "entries/s", took)


def tar_extract(root: Path, count: int) -> Measure:
    """Extract a tar of `count` small files (a source tree's worth)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "tree.tar"
        with tarfile.open(archive, "w") as tar:
            for i in range(count):
                data = os.urandom(512 + (i * 37) % 8192)
                info = tarfile.TarInfo(f"tree/d{i % 50:02d}/file{i}.c")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        dest = root / "untar"
        dest.mkdir()
        start = time.perf_counter()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
        took = time.perf_counter() - start
    shutil.rmtree(dest)
    return Measure(f"tar -x of {count} files", count / took, "files/s", took)


def run(root: Path, *, size_mib: int = 256, files: int = 1000, listing: int = 10_000,
        tar_files: int = 2000, step: Callable[[str], None] = lambda name: None) -> list[Measure]:
    """Every fs benchmark in a fresh subdirectory of root, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=".bench-", dir=root))
    try:
        step("sequential")
        results = sequential(work, size_mib)
        step("create")
        results.append(create_files(work, files))
        for writers in (1, 4):
            step(f"small files, {writers} writers")
            results.append(small_files(work, files, writers))
        step("ls -l")
        results.append(list_and_stat(work, listing))
        step("tar")
        results.append(tar_extract(work, tar_files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
