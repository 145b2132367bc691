"""The real CoordinatorService over authenticated RPC: namespace ops, cluster ops, bad input."""

from __future__ import annotations

import stat
from pathlib import Path

import msgpack
import pytest
import trio
from coord_helpers import SECRET, Coordinator, running_coordinator, start_nodes
from meta_helpers import dump

from dfs import rpc
from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO


@pytest.fixture
async def coord(tmp_path: Path):
    async with running_coordinator(tmp_path / "coord") as c:
        yield c


async def fails(coord: Coordinator, code: Code, op: str, **fields) -> DfsError:
    with pytest.raises(DfsError) as info:
        await coord.call(op, **fields)
    assert info.value.code is code, info.value
    return info.value


# ---------------------------------------------------------------- namespace


async def test_namespace_round_trip(coord: Coordinator) -> None:
    d = (await coord.call("mkdir", parent=ROOT_INO, name=b"d", mode=0o755, uid=7, gid=8))["attr"]
    assert d["mode"] == stat.S_IFDIR | 0o755 and (d["uid"], d["gid"]) == (7, 8)
    f = (await coord.call("create", parent=d["ino"], name=b"f", mode=0o644))["attr"]
    assert f["version"] == 0 and f["blob"] is None and f["replicas"] == []
    assert (await coord.call("lookup", parent=d["ino"], name=b"f"))["attr"] == f
    assert (await coord.call("resolve", path="/d/f"))["attr"]["ino"] == f["ino"]
    assert (await coord.call("getattr", ino=f["ino"]))["attr"]["ino"] == f["ino"]
    await coord.call("link", ino=f["ino"], parent=ROOT_INO, name=b"hard")
    await coord.call("symlink", parent=ROOT_INO, name=b"s", target=b"d/f")
    s = (await coord.call("resolve", path="/s"))["attr"]
    assert (await coord.call("readlink", ino=s["ino"]))["target"] == b"d/f"
    entries = (await coord.call("readdir", ino=ROOT_INO, after=0, limit=10))["entries"]
    assert [e[0] for e in entries] == [b"d", b"hard", b"s"]
    assert entries[1][2]["nlink"] == 2
    page = (await coord.call("readdir", ino=ROOT_INO, after=entries[0][1], limit=1))["entries"]
    assert [e[0] for e in page] == [b"hard"]
    await coord.call("rename", parent=ROOT_INO, name=b"hard", new_parent=d["ino"],
                     new_name=b"g", flags=0)
    await fails(coord, Code.EEXIST, "rename", parent=d["ino"], name=b"g", new_parent=d["ino"],
                new_name=b"f", flags=1)
    await coord.call("rename", parent=d["ino"], name=b"g", new_parent=d["ino"],
                     new_name=b"f", flags=2)
    a = (await coord.call("setattr", ino=f["ino"], mode=0o600, mtime_ns=5))["attr"]
    assert a["mode"] == stat.S_IFREG | 0o600 and a["mtime_ns"] == 5
    await coord.call("setxattr", ino=f["ino"], name=b"user.k", value=b"v", flags=1)
    await fails(coord, Code.EEXIST, "setxattr", ino=f["ino"], name=b"user.k", value=b"w",
                flags=1)
    assert (await coord.call("getxattr", ino=f["ino"], name=b"user.k"))["value"] == b"v"
    assert (await coord.call("listxattr", ino=f["ino"]))["names"] == [b"user.k"]
    await coord.call("removexattr", ino=f["ino"], name=b"user.k")
    await fails(coord, Code.ENODATA, "getxattr", ino=f["ino"], name=b"user.k")
    await coord.call("unlink", parent=d["ino"], name=b"f")
    await fails(coord, Code.ENOTEMPTY, "rmdir", parent=ROOT_INO, name=b"d")
    await coord.call("unlink", parent=d["ino"], name=b"g")
    await coord.call("rmdir", parent=ROOT_INO, name=b"d")
    await fails(coord, Code.ENOENT, "getattr", ino=f["ino"])
    statfs = await coord.call("statfs")
    assert statfs["files"] == 2 and statfs["replicas"] == 3  # root and the symlink


async def test_namespace_writes_are_durable_before_the_reply(tmp_path: Path) -> None:
    async with running_coordinator(tmp_path / "c") as c:
        await c.call("mkdir", parent=ROOT_INO, name=b"kept", mode=0o700)
    async with running_coordinator(tmp_path / "c") as c:
        assert (await c.call("resolve", path="/kept"))["attr"]["mode"] == stat.S_IFDIR | 0o700


# ---------------------------------------------------------------- bad input (I5)


@pytest.mark.parametrize(
    "op, fields, code",
    [
        ("no_such_op", {}, Code.BAD_REQUEST),
        ("mkdir", {"parent": ROOT_INO, "name": b"x"}, Code.BAD_REQUEST),  # no mode
        ("mkdir", {"parent": "1", "name": b"x", "mode": 0o755}, Code.BAD_REQUEST),
        ("mkdir", {"parent": -1, "name": b"x", "mode": 0o755}, Code.BAD_REQUEST),
        ("mkdir", {"parent": ROOT_INO, "name": b"a/b", "mode": 0o755}, Code.EINVAL),
        ("mkdir", {"parent": ROOT_INO, "name": b"..", "mode": 0o755}, Code.EINVAL),
        ("mkdir", {"parent": ROOT_INO, "name": b"", "mode": 0o755}, Code.EINVAL),
        ("create", {"parent": ROOT_INO, "name": b"a\0", "mode": 0o644}, Code.EINVAL),
        ("create", {"parent": ROOT_INO, "name": b"n" * 256, "mode": 0o644}, Code.ENAMETOOLONG),
        ("create", {"parent": 999, "name": b"x", "mode": 0o644}, Code.ENOENT),
        ("rename", {"parent": ROOT_INO, "name": b"x", "new_parent": ROOT_INO}, Code.BAD_REQUEST),
        ("setattr", {"ino": ROOT_INO, "size": 5}, Code.EISDIR),
        ("setattr", {"ino": ROOT_INO, "mode": "rwx"}, Code.BAD_REQUEST),
        ("setxattr", {"ino": ROOT_INO, "name": "user.x", "value": b"v"}, Code.BAD_REQUEST),
        ("readdir", {"ino": ROOT_INO, "after": True}, Code.BAD_REQUEST),
        ("resolve", {"path": "relative"}, Code.EINVAL),
        ("commit", {"txid": 5, "size": 1, "checksum": b"c" * 16, "nchunks": 1},
         Code.UNAVAILABLE),
        ("begin", {"ino": ROOT_INO}, Code.EISDIR),
        ("begin", {"ino": 999}, Code.ENOENT),
        ("begin", {"ino": ROOT_INO, "exclude": ["x"]}, Code.BAD_REQUEST),
        ("heartbeat", {"node_id": 42}, Code.ENOENT),
        ("register", {"address": "no-port"}, Code.EINVAL),
        ("node_drain", {"node_id": 3}, Code.ENOENT),
    ],
)
async def test_bad_requests_get_the_right_error_and_change_nothing(
        coord: Coordinator, op: str, fields: dict, code: Code) -> None:
    await coord.call("create", parent=ROOT_INO, name=b"existing", mode=0o644)
    before = dump(coord.store)
    await fails(coord, code, op, **fields)
    assert dump(coord.store) == before
    assert (await coord.call("lookup", parent=ROOT_INO, name=b"existing"))["attr"]


async def test_garbage_frames_are_refused_and_the_connection_keeps_serving(
        coord: Coordinator) -> None:
    before = dump(coord.store)
    conn = await rpc.connect(coord.address, SECRET)
    try:
        for body in (b"\xc1\xc1\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"id": 1})):
            await conn.frames.send_frame(len(body).to_bytes(4, "big") + body)
            reply = await conn.frames.receive()
            assert reply["ok"] is False and reply["error"] == "BAD_REQUEST"
        reply = await conn.call("getattr", {"ino": ROOT_INO})
        assert reply["ok"] and reply["attr"]["ino"] == ROOT_INO
    finally:
        await conn.aclose()
    assert dump(coord.store) == before


async def test_a_wrong_secret_is_refused(coord: Coordinator) -> None:
    with pytest.raises(DfsError) as info:
        await rpc.Peer(coord.address, b"w" * 40).call("getattr", ino=ROOT_INO)
    assert info.value.code is Code.AUTH


# ---------------------------------------------------------------- cluster ops


async def test_begin_with_too_few_live_nodes_is_unavailable(coord: Coordinator) -> None:
    f = (await coord.call("create", parent=ROOT_INO, name=b"f", mode=0o644))["attr"]
    err = await fails(coord, Code.UNAVAILABLE, "begin", ino=f["ino"])
    assert "need 3 live nodes, have 0" in err.msg
    async with trio.open_nursery() as nursery:
        await start_nodes(nursery, coord, 2)
        err = await fails(coord, Code.UNAVAILABLE, "begin", ino=f["ino"], base_version=0)
        assert "need 3 live nodes, have 2" in err.msg
        nursery.cancel_scope.cancel()
    assert (await coord.call("txn_list"))["txns"] == []


async def test_register_status_drain_remove(coord: Coordinator) -> None:
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3)
        assert [n.node_id for n in nodes] == [1, 2, 3]
        status = await coord.call("status")
        assert status["cluster"] == coord.store.cluster_id and status["replicas"] == 3
        assert [(n["id"], n["state"]) for n in status["nodes"]] == [
            (1, "up"), (2, "up"), (3, "up")]
        assert status["nodes"][0]["address"] == nodes[0].address
        assert (await coord.call("statfs"))["capacity"] == 1000
        await coord.call("node_drain", node_id=2)
        await coord.call("node_remove", node_id=3)
        listed = (await coord.call("node_list"))["nodes"]
        assert [n["state"] for n in listed] == ["up", "draining", "removed"]
        f = (await coord.call("create", parent=ROOT_INO, name=b"f", mode=0o644))["attr"]
        err = await fails(coord, Code.UNAVAILABLE, "begin", ino=f["ino"])
        assert "have 1" in err.msg, "draining and removed nodes take no new replicas"
        await fails(coord, Code.EPERM, "heartbeat", node_id=3)
        nodes[0].stop()  # a silent node: no more heartbeats
        await trio.sleep(1.5)
        assert (await coord.call("node_list"))["nodes"][0]["state"] == "down"
        nursery.cancel_scope.cancel()


async def test_report_bad_is_recorded_and_outcome_of_unknown_txid_is_aborted(
        coord: Coordinator) -> None:
    await coord.call("report_bad", ino=5, version=2, node_id=1, reason="checksum")
    assert (await coord.call("status"))["bad_reports"] == 1
    assert (await coord.call("outcome", txid=12345))["state"] == "aborted"
