"""Mount reads verify the whole-file xxh3_128 before serving a byte (issue 8, item 6b;
docs/mount.md "Verified reads"): a replica that is consistent but wrong (every chunk matches
its digest) is never served, the read fails over to a good replica, the bad one is reported
(and repaired by the coordinator), and only when no replica is good is the read EIO."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from checker_helpers import NODE_ARGS, MiB, copy_ok, put_files, stat
from mount_harness import mounted, require_fuse
from replica_damage import rewrite_chunk

from dfs.chunks import CHUNK_SIZE, file_checksum
from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from fuse_mount.cache import ReadCache


class Replicas:
    """A fake cluster whose nodes hold their own bytes of one version (a Source)."""

    retry_for = 0.0

    def __init__(self, copies: dict[int, bytes]) -> None:
        self.copies = copies
        self.reports: list[int] = []
        self.fetched: list[int] = []

    async def chunk(self, attr: Attr, index: int, node: int) -> bytes:
        self.fetched.append(node)
        await trio.sleep(0)
        return self.copies[node][index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]

    async def report(self, attr: Attr, node: int, reason: str) -> None:
        self.reports.append(node)


def wrong_but_consistent(data: bytes) -> bytes:
    return data[:CHUNK_SIZE] + bytes(b ^ 1 for b in data[CHUNK_SIZE:])


async def test_a_consistent_but_wrong_replica_is_skipped_and_reported(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 99)
    attr = Attr(ino=5, mode=0o100644, size=len(data), version=1, blob=7,
                checksum=file_checksum(data), replicas=(1, 2, 3))
    # Wrong in the chunk node 1 serves when the first read spreads over the replicas.
    bad = bytes(b ^ 1 for b in data[:CHUNK_SIZE]) + data[CHUNK_SIZE:]
    source = Replicas({1: bad, 2: data, 3: data})
    cache = ReadCache(tmp_path, 1 << 30, source)
    assert await cache.read(attr, CHUNK_SIZE, 10) == data[CHUNK_SIZE:CHUNK_SIZE + 10]
    assert await cache.read(attr, 0, len(data)) == data
    assert source.reports == [1]
    # The spread read (one chunk from each) fails the whole-file checksum; replica by
    # replica, node 1 fails and node 2 is read whole.
    assert source.fetched[:3] == [1, 2, 3] and source.fetched[6:] == [2, 2, 2]


async def test_no_good_replica_is_eio(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_SIZE + 5)
    attr = Attr(ino=5, mode=0o100644, size=len(data), version=1, blob=7,
                checksum=file_checksum(data), replicas=(1, 2))
    bad = wrong_but_consistent(data)
    source = Replicas({1: bad, 2: bad})
    cache = ReadCache(tmp_path, 1 << 30, source)
    with pytest.raises(DfsError) as caught:
        await cache.read(attr, 0, 10)
    assert caught.value.code is Code.CHECKSUM  # EIO through the mount
    assert sorted(source.reports) == [1, 2]
    assert cache.total == 0  # nothing of what they sent stays cached


def test_the_mount_never_serves_a_consistent_but_wrong_replica(
        cluster_factory, tmp_path: Path) -> None:
    require_fuse()
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 1, big=2 * MiB)
    f = stat(cluster, "/f0")
    # The replica a reader tries first, and the chunk it serves when reads are spread.
    first = cluster.node_name(f["replicas"][0])
    cluster.stop(first)
    rewrite_chunk(cluster, first, f["blob"], index=0)
    cluster.restart(first)
    with mounted(cluster, tmp_path / "m") as mount:
        with open(mount / "f0", "rb") as fh:
            fh.seek(CHUNK_SIZE + 10)
            assert fh.read(100) == files["/f0"][CHUNK_SIZE + 10:CHUNK_SIZE + 110]
        assert (mount / "f0").read_bytes() == files["/f0"]
    assert cluster.status()["bad_reports"] >= 1
    cluster.wait_until(lambda: copy_ok(cluster, first, f["blob"]), timeout=20,
                       message="the reported copy re-made by the coordinator")
