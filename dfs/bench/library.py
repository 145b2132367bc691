"""Through the client library: big-file put/get and small-file commit rate and latency."""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Callable, Iterator

import trio

from dfs.bench import Measure, percentile
from dfs.client import Client

MiB = 1024 * 1024
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class _Zeros(io.RawIOBase):
    """A seekable source of `size` pseudo-random bytes that never sits in memory whole."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.block = os.urandom(MiB)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.size - self.pos, MiB - self.pos % MiB)
        start = self.pos % MiB
        buf[:n] = self.block[start : start + n]
        self.pos += n
        return n


async def run(
    client: Client,
    *,
    size_mib: int = 256,
    small: int = 2000,
    writers: tuple[int, ...] = (1, 8),
    step: Callable[[str], None] = lambda name: None,
) -> list[Measure]:
    """Measure in a fresh directory /.bench-<random>, removed afterwards."""
    results: list[Measure] = []
    name = f".bench-{os.urandom(4).hex()}".encode()
    root = await client.mkdir(1, name, DIR, os.getuid(), os.getgid())
    try:
        step("put")
        big = await client.create(root.ino, b"big", FILE, 0, 0)
        size = size_mib * MiB
        start = time.perf_counter()
        attr = await client.write_file(big.ino, io.BufferedReader(_Zeros(size), MiB))
        took = time.perf_counter() - start
        results.append(Measure(f"put {size_mib} MiB", size / took / 1e6, "MB/s", took))
        step("get")
        start = time.perf_counter()
        await client.read_file(attr, lambda data: None)
        took = time.perf_counter() - start
        results.append(Measure(f"get {size_mib} MiB", size / took / 1e6, "MB/s", took))
        payload = os.urandom(4096)
        for n in writers:
            step(f"4 KiB commits, {n} writers")
            d = await client.mkdir(root.ino, f"small-{n}".encode(), DIR, 0, 0)
            inos = [(await client.create(d.ino, f"f{i}".encode(), FILE, 0, 0)).ino
                    for i in range(small)]
            latencies: list[float] = []

            async def writer(todo: Iterator[int], latencies: list[float]) -> None:
                for ino in todo:
                    t0 = time.perf_counter()
                    await client.write_file(ino, io.BytesIO(payload))
                    latencies.append(time.perf_counter() - t0)

            todo = iter(inos)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(writer, todo, latencies)
            took = time.perf_counter() - start
            results.append(Measure(
                f"4 KiB commits, {n} writer{'s' if n > 1 else ''}", small / took, "commits/s",
                took, {"p50_ms": round(percentile(latencies, 50) * 1e3, 2),
                       "p99_ms": round(percentile(latencies, 99) * 1e3, 2)}))
    finally:
        await _remove_tree(client, 1, name)
    return results


async def _remove_tree(client: Client, parent: int, name: bytes) -> None:
    attr = await client.lookup(parent, name)
    if attr.is_dir():
        for child, _ in await client.listdir(attr.ino):
            await _remove_tree(client, attr.ino, child)
        await client.rmdir(parent, name)
    else:
        await client.unlink(parent, name)
