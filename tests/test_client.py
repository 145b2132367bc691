"""The client library against a real cluster: streaming writes and reads, failover, retries."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable

import pytest
import trio
from cluster import Cluster

from dfs.chunks import CHUNK_SIZE
from dfs.client import Attr, Client
from dfs.errors import Code, DfsError

MiB = 1024 * 1024
FILE = stat.S_IFREG | 0o644


async def new_file(client: Client, name: str) -> Attr:
    root = await client.resolve("/")
    return await client.create(root.ino, name.encode(), FILE, 0, 0)


async def read_all(client: Client, attr: Attr) -> bytes:
    sink = io.BytesIO()
    await client.read_file(attr, sink)
    return sink.getvalue()


async def test_write_read_round_trip(shared_cluster: Cluster) -> None:
    data = os.urandom(7 * CHUNK_SIZE + 123)
    seen: list[int] = []
    async with shared_cluster.client(window=3, readahead=2) as client:
        attr = await new_file(client, "lib-round")
        source = io.BytesIO(data)
        source.seek(5)  # the source is read from 0 wherever it stands
        attr = await client.write_file(attr.ino, source, progress=seen.append)
        assert attr.size == len(data) and attr.version == 1 and len(attr.replicas) == 3
        assert seen == sorted(seen) and seen[-1] == len(data)
        assert await read_all(client, attr) == data
        chunks: list[bytes] = []
        assert await client.read_file(attr, chunks.append) == len(data)
        assert b"".join(chunks) == data
        assert await client.read_chunk(attr, 7) == data[7 * CHUNK_SIZE :]
        with pytest.raises(DfsError) as e:
            await client.read_chunk(attr, 8)
        assert e.value.code is Code.EINVAL


async def test_namespace_ops(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        root = await client.resolve("/")
        d = await client.mkdir(root.ino, b"lib-ns", stat.S_IFDIR | 0o755, 0, 0)
        assert d.is_dir() and not d.is_file()
        f = await client.create(d.ino, b"f", FILE, 0, 0)
        assert f.is_file() and f.version == 0 and f.blob is None
        assert (await client.lookup(d.ino, b"f")).ino == f.ino
        link = await client.symlink(d.ino, b"l", b"f", 0, 0)
        assert link.is_symlink() and await client.readlink(link.ino) == b"f"
        await client.rename(d.ino, b"f", d.ino, b"g")
        page = await client.readdir(d.ino)
        assert sorted(name for name, _, _ in page) == [b"g", b"l"]
        assert (await client.setattr(f.ino, mode=FILE & ~0o077)).mode & 0o777 == 0o600
        await client.setxattr(f.ino, b"user.k", b"v")
        assert await client.getxattr(f.ino, b"user.k") == b"v"
        assert b"user.k" in await client.listxattr(f.ino)
        await client.unlink(d.ino, b"g")
        await client.unlink(d.ino, b"l")
        await client.rmdir(root.ino, b"lib-ns")
        assert (await client.statfs())["replicas"] == 3


async def test_if_version_conflict(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        attr = await new_file(client, "lib-cas")
        await client.write_file(attr.ino, io.BytesIO(b"one"), base_version=0, if_version=True)
        with pytest.raises(DfsError) as e:
            await client.write_file(attr.ino, io.BytesIO(b"two"), base_version=0, if_version=True)
        assert e.value.code is Code.CONFLICT
        assert await read_all(client, await client.getattr(attr.ino)) == b"one"


async def test_superseded_version_reads_estale(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    async with cluster.client() as client:
        attr = await new_file(client, "stale")
        old = await client.write_file(attr.ino, io.BytesIO(b"old bytes"))
        await client.write_file(attr.ino, io.BytesIO(b"new bytes"))

        async def collected() -> bool:
            try:
                await client.read_chunk(old, 0)
            except DfsError as e:
                assert e.code is Code.ESTALE
                return True
            return False

        await cluster.await_until(collected, timeout=15, message="old version collected")


async def test_read_survives_a_dead_replica(cluster_factory: Callable[..., Cluster]) -> None:
    cluster = cluster_factory()
    data = os.urandom(3 * MiB)
    async with cluster.client() as client:
        attr = await client.write_file((await new_file(client, "f")).ino, io.BytesIO(data))
        cluster.kill(cluster.node_name(attr.replicas[0]))
        assert await read_all(client, attr) == data


async def test_bit_rot_fails_over_and_is_reported(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    data = os.urandom(2 * MiB + 5)
    async with cluster.client() as client:
        attr = await client.write_file((await new_file(client, "rot")).ino, io.BytesIO(data))
    victim = cluster.node_name(attr.replicas[0])
    cluster.stop(victim)
    cluster.corrupt_chunk(victim, attr.blob, index=1, offset=1000)
    cluster.restart(victim)
    async with cluster.client() as client:
        assert await read_all(client, attr) == data
    assert cluster.status().get("bad_reports", 1) >= 1


async def test_write_replaces_a_replica_that_dies_while_staging(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(nodes=4, env={"node-1": {"DFS_FAILPOINTS": "node.after_stage=crash"}})
    dead = cluster.node_id("node-1")
    async with cluster.client() as client:
        for i in range(8):  # placement is the coordinator's: write until node-1 was picked
            data = os.urandom(CHUNK_SIZE + i)
            attr = await client.write_file((await new_file(client, f"f{i}")).ino, io.BytesIO(data))
            assert dead not in attr.replicas
            assert await read_all(client, attr) == data
            if not cluster.running("node-1"):
                break
    assert not cluster.running("node-1")


async def test_write_retries_when_a_replica_votes_no(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory(nodes=4, env={"node-1": {"DFS_FAILPOINTS": "node.before_vote=error"}})
    bad = cluster.node_id("node-1")
    async with cluster.client() as client:
        for i in range(6):
            data = os.urandom(1000 + i)
            attr = await client.write_file((await new_file(client, f"v{i}")).ino, io.BytesIO(data))
            assert bad not in attr.replicas and attr.version == 1
            assert await read_all(client, attr) == data


async def test_lost_commit_reply_is_settled_by_outcome(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """The coordinator dies right after the decision: the write stands, and is not redone."""
    cluster = cluster_factory()
    async with cluster.client() as client:
        ino = (await new_file(client, "decided")).ino
    cluster.restart("coordinator", env={"DFS_FAILPOINTS": "coordinator.after_decision=crash"})
    data = os.urandom(CHUNK_SIZE + 1)
    async with cluster.client(retry_for=20) as client, trio.open_nursery() as nursery:

        async def revive() -> None:
            await cluster.await_until(lambda: not cluster.running("coordinator"), timeout=20)
            await trio.to_thread.run_sync(lambda: cluster.restart("coordinator", env={}))

        nursery.start_soon(revive)
        attr = await client.write_file(ino, io.BytesIO(data), base_version=0, if_version=True)
        assert attr.version == 1
        assert await read_all(client, attr) == data
