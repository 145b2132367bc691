"""The coordinator's 2PC driver against fake storage nodes over real RPC (the lead's cluster
tests run it against real nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from coord_helpers import Coordinator, running_coordinator, start_nodes

from dfs import failpoints
from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO

CK = b"\x42" * 16


@pytest.fixture
async def cluster(tmp_path: Path):
    async with running_coordinator(tmp_path / "coord") as coord, trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3)
        yield coord, nodes
        nursery.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def disarm_failpoints():
    yield
    failpoints.arm("")


async def new_file(coord: Coordinator, name: bytes = b"f") -> int:
    return (await coord.call("create", parent=ROOT_INO, name=name, mode=0o644))["attr"]["ino"]


async def write(coord: Coordinator, ino: int, size: int = 5, **begin_fields) -> dict:
    txn = await coord.call("begin", ino=ino, **begin_fields)
    return await coord.call("commit", txid=txn["txid"], size=size, checksum=CK, nchunks=1)


async def eventually(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def ended(coord: Coordinator) -> bool:
    return (await coord.call("txn_list"))["txns"] == []


async def wait_ended(coord: Coordinator, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not await ended(coord):
            await trio.sleep(0.05)


async def test_commit_prepares_everywhere_decides_then_delivers(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    txn = await coord.call("begin", ino=ino, base_version=0, if_version=True)
    assert sorted(r["id"] for r in txn["replicas"]) == [1, 2, 3]
    assert {r["address"] for r in txn["replicas"]} == {n.address for n in nodes}
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "inflight"
    attr = (await coord.call("commit", txid=txn["txid"], size=5, checksum=CK, nchunks=1,
                             mtime_ns=77))["attr"]
    assert (attr["version"], attr["blob"], attr["size"]) == (1, txn["txid"], 5)
    assert attr["checksum"] == CK and attr["mtime_ns"] == 77
    assert sorted(attr["replicas"]) == [1, 2, 3]
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "committed"
    await wait_ended(coord)
    for node in nodes:
        assert node.got("prepare") == [txn["txid"]] and node.got("commit") == [txn["txid"]]
    again = await coord.call("commit", txid=txn["txid"], size=5, checksum=CK, nchunks=1)
    assert again["attr"]["version"] == 1, "a retried COMMIT gets the same answer"


async def test_a_no_vote_aborts_everywhere(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    nodes[1].vote = Code.CHECKSUM
    txn = await coord.call("begin", ino=ino)
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=5, checksum=CK, nchunks=1)
    assert info.value.code is Code.UNAVAILABLE and "voted no" in info.value.msg
    assert info.value.details["failed"] == [nodes[1].node_id], "so the retry can exclude it"
    await eventually(lambda: all(n.got("abort") == [txn["txid"]] for n in nodes))
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "aborted"
    assert (await coord.call("getattr", ino=ino))["attr"]["version"] == 0
    assert not any(n.got("commit") for n in nodes)


async def test_enospc_vote_and_vote_timeout(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    nodes[2].vote = Code.ENOSPC
    with pytest.raises(DfsError) as info:
        await write(coord, ino)
    assert info.value.code is Code.ENOSPC
    nodes[2].vote = None
    nodes[0].vote_delay = 3.0  # vote_timeout is 1 s
    with trio.fail_after(2.5):
        with pytest.raises(DfsError) as info:
            await write(coord, ino)
    assert info.value.code is Code.UNAVAILABLE
    assert info.value.details["failed"] == [nodes[0].node_id]
    assert (await coord.call("getattr", ino=ino))["attr"]["version"] == 0


async def test_if_version_conflict_fails_before_any_prepare(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    stale = await coord.call("begin", ino=ino, base_version=0, if_version=True)
    await write(coord, ino)  # someone else commits version 1
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=stale["txid"], size=1, checksum=CK, nchunks=1)
    assert info.value.code is Code.CONFLICT
    assert all(stale["txid"] not in n.got("prepare") for n in nodes)
    await eventually(lambda: all(stale["txid"] in n.got("abort") for n in nodes))
    assert (await coord.call("getattr", ino=ino))["attr"]["version"] == 1


async def test_superseded_blob_is_deleted_after_the_grace_period(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    first = (await write(coord, ino))["attr"]["blob"]
    await write(coord, ino)
    await eventually(lambda: all([first] in n.got("delete") for n in nodes))
    assert (await coord.call("status"))["gc_pending"] == 0
    await coord.call("unlink", parent=ROOT_INO, name=b"f")
    assert (await coord.call("status"))["gc_pending"] == 3


async def test_commit_is_redelivered_until_acked(cluster) -> None:
    coord, nodes = cluster
    nodes[2].refuse_commits = 3
    ino = await new_file(coord)
    attr = (await write(coord, ino))["attr"]
    txns = (await coord.call("txn_list"))["txns"]
    assert [t["state"] for t in txns] == ["committed"]
    await wait_ended(coord)
    assert nodes[2].got("commit") == [attr["blob"]] * 4


async def test_restart_resends_owed_commits(tmp_path: Path) -> None:
    data = tmp_path / "coord"
    async with trio.open_nursery() as nursery:
        async with running_coordinator(data) as coord:
            nodes = await start_nodes(nursery, coord, 3)
            nodes[0].refuse_commits = 10**6
            blob = (await write(coord, await new_file(coord)))["attr"]["blob"]
            await trio.sleep(0.3)
            assert not await ended(coord)
        for node in nodes:
            node.heartbeating = False
        await trio.sleep(0.2)
        async with running_coordinator(data) as coord:
            assert [t["txid"] for t in (await coord.call("txn_list"))["txns"]] == [blob]
            nodes[0].refuse_commits = 0
            for node in nodes:
                node.coordinator = coord.address
                node.heartbeating = True
            await wait_ended(coord)
            assert nodes[0].got("commit")[-1] == blob
            assert (await coord.call("outcome", txid=blob))["state"] == "committed"
            fresh = await coord.call("begin", ino=await new_file(coord, b"g"))
            assert fresh["txid"] > blob, "txids are not reused after a restart"
        nursery.cancel_scope.cancel()


async def test_client_abort_and_silent_client_expiry(tmp_path: Path) -> None:
    async with running_coordinator(tmp_path / "c", txn_timeout=0.3) as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3)
        ino = await new_file(coord)
        txn = await coord.call("begin", ino=ino)
        await coord.call("abort", txid=txn["txid"])
        assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "aborted"
        await eventually(lambda: all(n.got("abort") == [txn["txid"]] for n in nodes))
        silent = await coord.call("begin", ino=ino)
        await eventually(lambda: all(silent["txid"] in n.got("abort") for n in nodes))
        assert (await coord.call("outcome", txid=silent["txid"]))["state"] == "aborted"
        with pytest.raises(DfsError) as info:
            await coord.call("commit", txid=silent["txid"], size=1, checksum=CK, nchunks=1)
        assert info.value.code is Code.UNAVAILABLE
        nursery.cancel_scope.cancel()


async def test_placement_skips_down_nodes_and_honours_exclude(tmp_path: Path) -> None:
    async with running_coordinator(tmp_path / "c") as coord, trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 4)
        ino = await new_file(coord)
        txn = await coord.call("begin", ino=ino, exclude=[1])
        assert sorted(r["id"] for r in txn["replicas"]) == [2, 3, 4]
        nodes[3].heartbeating = False
        await trio.sleep(1.3)
        txn = await coord.call("begin", ino=ino)
        assert sorted(r["id"] for r in txn["replicas"]) == [1, 2, 3]
        with pytest.raises(DfsError, match="need 3 live nodes, have 2"):
            await coord.call("begin", ino=ino, exclude=[2])
        nursery.cancel_scope.cancel()


async def test_concurrent_commits_all_land(cluster) -> None:
    coord, _ = cluster
    inos = [await new_file(coord, b"f%d" % i) for i in range(20)]
    results: list[dict] = []

    async def one(ino: int) -> None:
        results.append((await write(coord, ino))["attr"])

    async with trio.open_nursery() as nursery:
        for ino in inos:
            nursery.start_soon(one, ino)
    assert sorted(a["ino"] for a in results) == inos and {a["version"] for a in results} == {1}
    assert len({a["blob"] for a in results}) == 20


async def test_failpoint_before_decision_aborts(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    failpoints.arm("coordinator.before_decision=error")
    txn = await coord.call("begin", ino=ino)
    with pytest.raises(DfsError):
        await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=1)
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "aborted"
    assert all(n.got("prepare") == [txn["txid"]] for n in nodes)
    await eventually(lambda: all(n.got("abort") == [txn["txid"]] for n in nodes))


async def test_failpoint_after_decision_keeps_the_write(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    failpoints.arm("coordinator.after_decision=error")
    txn = await coord.call("begin", ino=ino)
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=1)
    assert info.value.code is Code.INTERNAL
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "committed"
    assert (await coord.call("getattr", ino=ino))["attr"]["blob"] == txn["txid"]
    await wait_ended(coord)


async def test_failpoint_mid_commit_stops_after_the_first_replica(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    failpoints.arm("coordinator.mid_commit=delay:500")
    txn = await coord.call("begin", ino=ino)
    first = txn["replicas"][0]["id"]
    await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=1)
    await trio.sleep(0.25)
    got = {n.node_id: n.got("commit") for n in nodes}
    assert got[first] == [txn["txid"]]
    assert [got[n] for n in got if n != first] == [[], []]
    await wait_ended(coord)
    assert all(n.got("commit") == [txn["txid"]] for n in nodes)


async def test_commit_to_a_file_deleted_meanwhile_is_enoent(cluster) -> None:
    coord, nodes = cluster
    ino = await new_file(coord)
    txn = await coord.call("begin", ino=ino)
    await coord.call("unlink", parent=ROOT_INO, name=b"f")
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=1)
    assert info.value.code is Code.ENOENT
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=2)
    assert info.value.code is Code.UNAVAILABLE


async def test_bad_commit_fields_leave_the_transaction_open(cluster) -> None:
    coord, _ = cluster
    ino = await new_file(coord)
    txn = await coord.call("begin", ino=ino)
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=1, checksum=b"short", nchunks=1)
    assert info.value.code is Code.BAD_REQUEST
    with pytest.raises(DfsError) as info:
        await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=3)
    assert info.value.code is Code.BAD_REQUEST
    assert (await coord.call("outcome", txid=txn["txid"]))["state"] == "inflight"
    attr = await coord.call("commit", txid=txn["txid"], size=1, checksum=CK, nchunks=1)
    assert attr["attr"]["version"] == 1
