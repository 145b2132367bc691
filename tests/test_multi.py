"""Several files in one atomic commit against a real cluster (docs/design.md §5, "Several
files"): all or none under a conflict, under a NO vote, with namespace operations; readers
never see a mix; the named limits are enforced."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import trio
from cluster import Cluster

from dfs.client import Client
from dfs.errors import Code, DfsError
from dfs.txnops import MAX_TXN_FILES


async def cat(client: Client, path: str) -> bytes | None:
    try:
        attr = await client.resolve(path)
    except DfsError as e:
        if e.code is Code.ENOENT:
            return None
        raise
    sink = io.BytesIO()
    await client.read_file(attr, sink)
    return sink.getvalue()


async def put(client: Client, path: str, data: bytes) -> int:
    async with client.transaction() as t:
        t.write(path, data)
    return t.attrs[path].version


async def test_three_files_commit_in_one_transaction(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        for name in "abc":
            await put(client, f"/m1-{name}", b"old " + name.encode())
        async with client.transaction() as t:
            t.write("/m1-a", b"new a", if_version=1)
            t.write("/m1-b", os.urandom(3 * 1024 * 1024 + 5))  # a multi-chunk member
            t.write("/m1-new", b"created in the decision", if_version=0)
            t.remove("/m1-c")
            t.mkdir("/m1-dir")
        assert t.attrs["/m1-a"].version == 2 and t.attrs["/m1-new"].version == 1
        assert await cat(client, "/m1-a") == b"new a"
        assert await cat(client, "/m1-new") == b"created in the decision"
        assert await cat(client, "/m1-c") is None
        assert (await client.resolve("/m1-dir")).is_dir()


async def test_a_conflict_on_one_file_commits_none_and_names_it(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        for name in "abc":
            await put(client, f"/m2-{name}", b"old " + name.encode())
        await put(client, "/m2-b", b"moved on")  # /m2-b is at version 2 now
        with pytest.raises(DfsError) as e:
            async with client.transaction() as t:
                t.write("/m2-a", b"new a", if_version=1)
                t.write("/m2-b", b"new b", if_version=1)
                t.write("/m2-c", b"new c", if_version=1)
                t.remove("/m2-a")  # not applied either
        assert e.value.code is Code.CONFLICT
        assert "/m2-b is at version 2" in e.value.msg
        assert await cat(client, "/m2-a") == b"old a"
        assert await cat(client, "/m2-b") == b"moved on"
        assert await cat(client, "/m2-c") == b"old c"
        for name, version in (("a", 1), ("b", 2), ("c", 1)):
            assert (await client.resolve(f"/m2-{name}")).version == version


async def test_a_failing_namespace_op_commits_none(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        await put(client, "/m3-a", b"old a")
        with pytest.raises(DfsError) as e:
            async with client.transaction() as t:
                t.write("/m3-a", b"new a")
                t.rename("/m3-missing", "/m3-x")
        assert e.value.code is Code.ENOENT
        assert await cat(client, "/m3-a") == b"old a"


async def test_an_exception_in_the_block_commits_nothing(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        with pytest.raises(RuntimeError):
            async with client.transaction() as t:
                t.write("/m4-a", b"never")
                raise RuntimeError("changed my mind")
        assert await cat(client, "/m4-a") is None
        assert (await client.status())["inflight"] == 0


async def test_limits_are_named_and_enforced(shared_cluster: Cluster) -> None:
    async with shared_cluster.client() as client:
        t = client.transaction()
        for i in range(MAX_TXN_FILES):
            t.write(f"/m5-{i}", b"x")
        with pytest.raises(DfsError) as e:
            t.write("/m5-over", b"x")
        assert e.value.code is Code.TOO_BIG and "MAX_TXN_FILES" in e.value.msg
        # The coordinator enforces it too, whatever the client library does.
        with pytest.raises(DfsError) as e:
            await client.coordinator.call("commit_txn", ops=[
                {"op": "remove", "path": f"/m5-{i}"} for i in range(1000)])
        assert e.value.code is Code.TOO_BIG and "MAX_TXN_OPS" in e.value.msg


async def test_readers_never_see_a_mix(shared_cluster: Cluster) -> None:
    """A reader loop against three files while a writer commits generations of all three in
    one transaction each: every read (at one resolve of each) shows one generation."""
    paths = [f"/m6-{n}" for n in "abc"]
    async with shared_cluster.client() as client:
        async with client.transaction() as t:
            for p in paths:
                t.write(p, b"gen 0")
        mixes: list[list[bytes | None]] = []
        reads = 0
        done = trio.Event()

        async def writer() -> None:
            for gen in range(1, 11):
                async with client.transaction() as t:
                    for p in paths:
                        t.write(p, b"gen %d" % gen)
            done.set()

        async def reader() -> None:
            nonlocal reads
            while not done.is_set():
                # One call resolves all three at one decision point (the consistent read).
                seen = await client.read_consistent(paths)
                reads += 1
                if len(set(seen.values())) != 1:
                    mixes.append(list(seen.values()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
        assert reads > 5, "the reader did not overlap the writer"
        assert not mixes


def test_put_atomic_cli(shared_cluster: Cluster, tmp_path: Path) -> None:
    srcs = []
    for name in "abc":
        src = tmp_path / name
        src.write_bytes(b"cli " + name.encode())
        srcs.append(src)
    args = [x for name, src in zip("abc", srcs, strict=True) for x in (src, f"/m7-{name}")]
    ok = shared_cluster.dfs("put", "--atomic", *args)
    assert ok.returncode == 0, ok.stderr
    assert shared_cluster.dfs("cat", "/m7-b").stdout == b"cli b"
    srcs[1].write_bytes(b"second")
    bad = shared_cluster.dfs("put", "--atomic", *args, "--if-version", "/m7-a=1",
                             "--if-version", "/m7-c=7")
    assert bad.returncode == 1
    line = bad.stderr.decode()
    assert line.count("\n") == 1 and "/m7-c is at version 1" in line, line
    assert shared_cluster.dfs("cat", "/m7-b").stdout == b"cli b", "nothing was committed"
    assert shared_cluster.dfs_json("stat", "/m7-a")["version"] == 1


def test_txn_run_and_get_consistent_cli(shared_cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"from txn run")
    assert shared_cluster.dfs("put", "-", "/m8-old", input=b"old").returncode == 0
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps([
        {"op": "mkdir", "path": "/m8-d"},
        {"op": "write", "src": str(src), "path": "/m8-d/f", "if_version": 0},
        {"op": "rename", "src": "/m8-old", "dst": "/m8-d/renamed"}]))
    ok = shared_cluster.dfs("txn", "run", ops)
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "out"
    out.mkdir()
    got = shared_cluster.dfs("get", "--consistent", "/m8-d/f", "/m8-d/renamed", out)
    assert got.returncode == 0, got.stderr
    assert (out / "f").read_bytes() == b"from txn run"
    assert (out / "renamed").read_bytes() == b"old"
    again = shared_cluster.dfs("txn", "run", ops)  # /m8-d exists now: none of it applies
    assert again.returncode == 1 and again.stderr.count(b"\n") == 1, again.stderr
    assert shared_cluster.dfs_json("stat", "/m8-d/f")["version"] == 1
