"""The storage node over real sockets: NodeService via dfs.rpc.serve, talked to with Peer."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from dfs import failpoints
from dfs.chunks import CHUNK_SIZE, file_checksum, nchunks
from dfs.errors import Code, DfsError
from dfs.rpc import Peer, Request, Service, connect, serve
from storage_node.node import Node, NodeConfig
from storage_node.participant import Participant
from storage_node.server import MAX_TXIDS_PER_COMMIT, NodeService
from storage_node.store import BlobState, BlobStore

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def raises(code: Code) -> pytest.RaisesExc:
    return pytest.raises(DfsError, match=f"^{code.value}:")


def blob_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def split(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    return path


@dataclass
class NodeUnderTest:
    store: BlobStore
    service: NodeService
    peer: Peer
    address: str

    async def stage_all(self, txid: int, data: bytes) -> None:
        for index, chunk in enumerate(split(data)):
            await self.peer.call("stage", txid=txid, index=index, data=chunk)

    async def prepare(self, txid: int, data: bytes, **override: Any) -> dict:
        fields = dict(size=len(data), checksum=file_checksum(data), nchunks=nchunks(len(data)))
        return await self.peer.call("prepare", txid=txid, **{**fields, **override})


async def start_node(
    nursery: trio.Nursery, data: Path, secret_file: Path, capacity: int | None = None
) -> NodeUnderTest:
    secret = secret_file.read_bytes().strip()
    store = BlobStore.open(data, capacity=capacity)
    await nursery.start(store.db.run_writer)
    service = NodeService(store, Participant())
    listeners = await nursery.start(
        partial(serve, service, "127.0.0.1", 0, secret, lambda: store.cluster)
    )
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return NodeUnderTest(store, service, Peer(address, secret), address)


@pytest.fixture
async def node(tmp_path: Path, secret_file: Path, nursery: trio.Nursery) -> NodeUnderTest:
    n = await start_node(nursery, tmp_path / "node", secret_file)
    yield n
    await n.peer.aclose()
    n.store.close()


@pytest.fixture
def armed() -> Iterator[Callable[[str], None]]:
    """Arm failpoints in this process for one test; always disarmed afterwards."""
    yield failpoints.arm
    failpoints.arm("")


# ---------------------------------------------------------------- the write transaction


async def test_stage_prepare_commit_read(node: NodeUnderTest) -> None:
    data = blob_bytes(2 * CHUNK_SIZE + 777)
    await node.stage_all(11, data)
    assert (await node.prepare(11, data))["ok"] is True  # vote YES
    assert node.store.stat(11).state == BlobState.PREPARED
    await node.peer.call("commit", txid=11)
    await node.peer.call("commit", txid=11)  # duplicate COMMIT is acked
    got = []
    for index in range(3):
        reply = await node.peer.call("read", blob=11, index=index)
        assert len(reply["digest"]) == 8
        got.append(reply["data"])
    assert b"".join(got) == data
    stat = (await node.peer.call("stat", blobs=[11, 12]))["blobs"]
    assert stat[12] is None
    assert stat[11]["state"] == "COMMITTED" and stat[11]["size"] == len(data)
    assert stat[11]["checksum"] == file_checksum(data) and stat[11]["nchunks"] == 3


async def test_batched_commit_acks_each_committable_txid_and_refuses_the_rest(
    node: NodeUnderTest,
) -> None:
    """One COMMIT carries many transactions' txids: each is judged as a COMMIT of its own
    (refused ones with the single op's code), and every COMMITTED record is forced in one
    durable write (one fsync for the batch)."""
    data = blob_bytes(3000)
    for txid in (21, 22, 23):
        await node.stage_all(txid, data)
        await node.prepare(txid, data)
    await node.peer.call("commit", txid=23)  # already COMMITTED: acked again
    await node.stage_all(24, data)  # STAGED, never prepared: CONFLICT
    durable_writes = []
    write = node.store.db.write

    async def counting(fn: Any, *, durable: bool = True) -> Any:
        durable_writes.append(durable)
        return await write(fn, durable=durable)

    node.store.db.write = counting  # observe the store's writes; the store is real
    before = await node.peer.call("node_info")
    reply = await node.peer.call("commit", txids=[21, 22, 23, 24, 25])  # 25: never here
    node.store.db.write = write
    assert sorted(reply["acked"]) == [21, 22, 23]
    refused = {txid: (code, msg) for txid, code, msg in reply["refused"]}
    assert set(refused) == {24, 25}
    assert refused[24] == ("CONFLICT", "blob 24 is not prepared")
    assert refused[25] == ("ENOENT", "blob 25 not here; COMMIT refused")
    assert durable_writes == [True]  # 21 and 22 forced together
    for txid in (21, 22, 23):
        assert node.store.stat(txid).state == BlobState.COMMITTED
    assert node.store.stat(24).state == BlobState.STAGED and node.store.stat(25) is None
    after = await node.peer.call("node_info")
    assert after["commit_requests"] == before["commit_requests"] + 1
    assert after["commit_txids"] == before["commit_txids"] + 5
    # The single form answers as it always has: a refusal is an error reply.
    with raises(Code.CONFLICT):
        await node.peer.call("commit", txid=24)

    # A batched ABORT drops what it may and refuses a COMMITTED blob.
    reply = await node.peer.call("abort", txids=[24, 21, 26])
    assert sorted(reply["acked"]) == [24, 26]
    assert [r[:2] for r in reply["refused"]] == [[21, "CONFLICT"]]
    assert node.store.stat(24) is None and node.store.stat(21).state == BlobState.COMMITTED


async def test_bad_batched_commit_is_bad_request_and_changes_nothing(
    node: NodeUnderTest,
) -> None:
    data = blob_bytes(100)
    await node.stage_all(31, data)
    await node.prepare(31, data)
    too_many = [31, *range(1000, 1000 + MAX_TXIDS_PER_COMMIT)]
    for fields in ({"txids": [31, "x"]}, {"txids": [31, -1]}, {"txids": 31},
                   {"txids": too_many}, {"txid": 31, "txids": [31]}, {}):
        for op in ("commit", "abort"):
            with raises(Code.BAD_REQUEST):
                await node.peer.call(op, **fields)
    assert node.store.stat(31).state == BlobState.PREPARED


async def test_wrong_checksum_votes_no_and_blob_is_not_prepared(node: NodeUnderTest) -> None:
    data = blob_bytes(5000)
    await node.stage_all(1, data)
    with raises(Code.CHECKSUM):
        await node.prepare(1, data, checksum=file_checksum(b"something else"))
    assert node.store.stat(1).state == BlobState.STAGED
    await node.peer.call("abort", txid=1)
    assert node.store.stat(1) is None


async def test_missing_chunk_votes_no(node: NodeUnderTest) -> None:
    data = blob_bytes(2 * CHUNK_SIZE)
    await node.peer.call("stage", txid=2, index=1, data=data[CHUNK_SIZE:])
    with raises(Code.ENOENT):
        await node.prepare(2, data)
    assert node.store.stat(2).state == BlobState.STAGED
    with raises(Code.ENOENT):
        await node.prepare(3, data)  # never staged at all


async def test_prepare_idempotent_and_late_messages(node: NodeUnderTest) -> None:
    data = blob_bytes(100)
    await node.stage_all(4, data)
    await node.prepare(4, data)
    await node.prepare(4, data)  # duplicate PREPARE: YES again
    with raises(Code.CONFLICT):
        await node.prepare(4, data + b"x")  # ... but NO for other content
    await node.peer.call("commit", txid=4)
    await node.peer.call("commit", txid=4)  # duplicate COMMIT: acked again
    await node.prepare(4, data)  # YES even after COMMIT
    with raises(Code.CONFLICT):
        await node.prepare(4, data[:50])
    with raises(Code.CONFLICT):
        await node.peer.call("abort", txid=4)  # a committed blob is never aborted
    assert node.store.read_chunk(4, 0)[0] == data

    await node.stage_all(5, data)
    await node.peer.call("abort", txid=5)
    await node.peer.call("abort", txid=5)  # duplicate ABORT
    with raises(Code.CONFLICT):
        await node.prepare(5, data)  # a late PREPARE after ABORT votes NO
    with raises(Code.CONFLICT):
        await node.peer.call("stage", txid=5, index=0, data=data)  # a late STAGE is refused
    assert node.store.stat(5) is None


async def test_capacity_full_is_enospc_and_node_keeps_serving(
    tmp_path: Path, secret_file: Path, nursery: trio.Nursery
) -> None:
    node = await start_node(nursery, tmp_path / "small", secret_file, capacity=2 * MiB + MiB // 2)
    chunk = blob_bytes(CHUNK_SIZE)
    await node.stage_all(1, chunk)
    await node.stage_all(2, chunk)
    with raises(Code.ENOSPC):
        await node.stage_all(3, chunk)
    info = await node.peer.call("node_info")
    assert info["capacity"] == 2 * MiB + MiB // 2 and info["used"] > 2 * MiB
    await node.prepare(1, chunk)  # the node still votes, commits and reads
    await node.peer.call("commit", txid=1)
    assert (await node.peer.call("read", blob=1, index=0))["data"] == chunk
    await node.peer.call("abort", txid=2)
    await node.stage_all(3, chunk)  # space freed by the abort is usable
    await node.peer.aclose()
    node.store.close()


async def test_bit_rot_read_gives_checksum(node: NodeUnderTest) -> None:
    data = blob_bytes(CHUNK_SIZE + 10)
    await node.stage_all(6, data)
    await node.prepare(6, data)
    await node.peer.call("commit", txid=6)
    key = struct.pack(">QI", 6, 0)
    with node.store.db.env.begin(write=True) as txn:
        value = bytearray(txn.get(key, db=node.store.db["chunks"]))
        value[8 + 4242] ^= 0x01
        txn.put(key, bytes(value), db=node.store.db["chunks"])
    with raises(Code.CHECKSUM):
        await node.peer.call("read", blob=6, index=0)
    assert (await node.peer.call("read", blob=6, index=1))["data"] == data[CHUNK_SIZE:]
    with raises(Code.ENOENT):
        await node.peer.call("read", blob=999, index=0)


# ---------------------------------------------------------------- bad input (I5)


async def test_bad_requests_get_bad_request_and_connection_keeps_serving(
    node: NodeUnderTest, secret_file: Path
) -> None:
    conn = await connect(node.address, secret_file.read_bytes().strip())
    try:
        bad = [
            ("no_such_op", {}),
            ("stage", {"txid": 1, "index": 0}),  # no data
            ("stage", {"txid": "1", "index": 0, "data": b"x"}),  # mistyped
            ("stage", {"txid": -1, "index": 0, "data": b"x"}),
            ("stage", {"txid": 1, "index": 2**32, "data": b"x"}),
            ("stage", {"txid": 1, "index": 0, "data": b"x" * (CHUNK_SIZE + 1)}),
            ("prepare", {"txid": 1, "size": 1, "checksum": b"short", "nchunks": 1}),
            ("read", {"blob": 1}),
            ("stat", {"blobs": ["a"]}),
            ("delete", {"blobs": 5}),
        ]
        for op, fields in bad:
            reply = await conn.call(op, fields)
            assert reply["ok"] is False and reply["error"] == "BAD_REQUEST", (op, reply)
        assert (await conn.call("node_info", {}))["ok"] is True
    finally:
        await conn.aclose()
    assert node.store.list() == []  # no data changed


async def test_list_delete_node_info(node: NodeUnderTest) -> None:
    for txid in (3, 1, 2):
        await node.stage_all(txid, b"abc")
    await node.prepare(2, b"abc")
    page = (await node.peer.call("list", after=0, limit=2))["blobs"]
    assert page == [[1, "STAGED", None, None], [2, "PREPARED", 3, file_checksum(b"abc")]]
    assert [b[0] for b in (await node.peer.call("list", after=2))["blobs"]] == [3]
    assert (await node.peer.call("delete", blobs=[1, 2, 9]))["deleted"] == 2
    info = await node.peer.call("node_info")
    assert info["blobs"] == 1 and info["node_id"] == 0 and info["cluster"] == ""
    assert info["capacity"] > info["used"] > 0


async def stage_prepare(node: NodeUnderTest, txid: int, data: bytes, index: int = 0,
                        **override: Any) -> dict:
    """A STAGE of `data`'s last chunk carrying the prepare fields (docs/design.md §5, rule 2)."""
    fields = dict(size=len(data), checksum=file_checksum(data), nchunks=nchunks(len(data)))
    return await node.peer.call("stage", txid=txid, index=index,
                                data=split(data)[index], **{**fields, **override})


async def test_a_stage_carrying_prepare_stores_and_votes_yes(node: NodeUnderTest) -> None:
    data = blob_bytes(4096)
    assert (await stage_prepare(node, 21, data))["ok"] is True  # the YES vote
    info = node.store.stat(21)
    assert info.state == BlobState.PREPARED and info.size == len(data)
    assert info.checksum == file_checksum(data) and info.nchunks == 1
    assert node.service.participant.state(21) == "PREPARED"  # its OUTCOME timer runs
    await stage_prepare(node, 21, data)  # re-sent: YES again
    with raises(Code.CONFLICT):
        await stage_prepare(node, 21, data, checksum=file_checksum(b"other"))
    await node.peer.call("commit", txid=21)
    assert node.store.read_chunk(21, 0)[0] == data
    await stage_prepare(node, 21, data)  # even after COMMIT, as PREPARE


async def test_a_stage_carrying_prepare_votes_no_like_prepare(node: NodeUnderTest) -> None:
    data = blob_bytes(3000)
    with raises(Code.CHECKSUM):
        await stage_prepare(node, 22, data, checksum=file_checksum(b"something else"))
    assert node.store.stat(22) is None  # nothing stored: one write does both, or neither
    with raises(Code.EINVAL):
        await stage_prepare(node, 22, data, size=len(data) + 1)
    with raises(Code.BAD_REQUEST):
        await stage_prepare(node, 22, data, checksum=b"short")
    await stage_prepare(node, 22, data)  # and a good one after all that is a YES
    await node.stage_all(23, data)
    await node.peer.call("abort", txid=23)
    with raises(Code.CONFLICT):
        await stage_prepare(node, 23, data)  # aborted: NO


async def test_the_last_chunk_may_carry_prepare_once_the_others_are_staged(
    node: NodeUnderTest,
) -> None:
    data = blob_bytes(2 * CHUNK_SIZE + 5)
    with raises(Code.ENOENT):
        await stage_prepare(node, 24, data, index=2)  # chunks 0 and 1 are not here
    assert node.store.stat(24) is None
    with raises(Code.EINVAL):
        await stage_prepare(node, 24, data, index=1)  # not the last chunk
    for index in (0, 1):
        await node.peer.call("stage", txid=24, index=index, data=split(data)[index])
    await stage_prepare(node, 24, data, index=2)
    assert node.store.stat(24).state == BlobState.PREPARED
    got = [node.store.read_chunk(24, i)[0] for i in range(3)]
    assert b"".join(got) == data


# ---------------------------------------------------------------- failpoints


async def test_failpoints_fire_after_the_durable_step(
    node: NodeUnderTest, armed: Callable[[str], None]
) -> None:
    data = blob_bytes(300)
    armed("node.after_stage=error")
    with raises(Code.INTERNAL):
        await node.stage_all(7, data)
    assert node.store.stat(7).state == BlobState.STAGED  # the chunk was stored first
    armed("node.before_vote=error")
    with raises(Code.INTERNAL):
        await node.prepare(7, data)
    assert node.store.stat(7).state == BlobState.PREPARED  # checked and forced first
    armed("node.before_commit_ack=error")
    with raises(Code.INTERNAL):
        await node.peer.call("commit", txid=7)
    assert node.store.stat(7).state == BlobState.COMMITTED
    armed("")
    await node.peer.call("commit", txid=7)
    # A STAGE carrying the prepare fields passes both points after its one forced write.
    for point in ("node.after_stage", "node.before_vote"):
        armed(f"{point}=error")
        txid = 8 if point == "node.after_stage" else 9
        with raises(Code.INTERNAL):
            await stage_prepare(node, txid, data)
        assert node.store.stat(txid).state == BlobState.PREPARED
    armed("")


# ---------------------------------------------------------------- with a coordinator


class FakeCoordinator(Service):
    def __init__(self, outcomes: dict[int, list[str]] | None = None) -> None:
        self.registrations: list[dict] = []
        self.heartbeats: list[dict] = []
        self.asked: list[int] = []
        self.outcomes = outcomes or {}

    async def op_register(self, req: Request) -> dict:
        self.registrations.append(dict(req.msg))
        return {"node_id": 7, "cluster": "c1"}

    async def op_heartbeat(self, req: Request) -> dict:
        self.heartbeats.append(dict(req.msg))
        return {}

    async def op_outcome(self, req: Request) -> dict:
        txid = req.int("txid")
        self.asked.append(txid)
        answers = self.outcomes.get(txid, ["aborted"])
        return {"state": answers.pop(0) if len(answers) > 1 else answers[0]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_registers_when_coordinator_appears_and_heartbeats(
    tmp_path: Path, secret_file: Path, nursery: trio.Nursery
) -> None:
    secret = secret_file.read_bytes().strip()
    port = free_port()
    store = BlobStore.open(tmp_path / "n")
    config = NodeConfig(
        data=tmp_path / "n", secret=secret, coordinator=f"127.0.0.1:{port}", heartbeat=0.05
    )
    node = Node(config, store)
    address = await nursery.start(node.run)
    peer = Peer(address, secret)
    assert (await peer.call("node_info"))["node_id"] == 0  # serves with no coordinator
    await trio.sleep(0.3)
    coordinator = FakeCoordinator()
    await nursery.start(partial(serve, coordinator, "127.0.0.1", port, secret, lambda: "c1"))
    await wait_for(lambda: len(coordinator.heartbeats) >= 3)
    reg = coordinator.registrations[0]
    assert reg["node_id"] == 0 and reg["address"] == address
    assert reg["capacity"] >= reg["used"] > 0
    assert coordinator.heartbeats[-1]["node_id"] == 7
    assert (store.node_id, store.cluster) == (7, "c1")
    conn = await connect(address, secret, expect_cluster="c1")  # the handshake announces it
    assert conn.cluster == "c1"
    await conn.aclose()
    await peer.aclose()


async def test_restart_resolves_prepared_blobs_and_drops_stale_staged(
    tmp_path: Path, secret_file: Path, nursery: trio.Nursery
) -> None:
    secret = secret_file.read_bytes().strip()
    data = blob_bytes(CHUNK_SIZE + 3)
    # First life: two prepared blobs and one staged one, then a crash (close without COMMIT).
    store = BlobStore.open(tmp_path / "n")
    async with trio.open_nursery() as first_life:
        await first_life.start(store.db.run_writer)
        for txid in (1, 2, 3):
            for index, chunk in enumerate(split(data)):
                await store.stage(txid, index, chunk)
        for txid in (1, 2):
            await store.prepare(txid, len(data), file_checksum(data), 2)
        first_life.cancel_scope.cancel()
    store.close()

    port = free_port()
    coordinator = FakeCoordinator({1: ["inflight", "inflight", "committed"], 2: ["aborted"]})
    await nursery.start(partial(serve, coordinator, "127.0.0.1", port, secret, lambda: "c1"))
    store = BlobStore.open(tmp_path / "n")
    config = NodeConfig(
        data=tmp_path / "n",
        secret=secret,
        coordinator=f"127.0.0.1:{port}",
        staged_timeout_s=0.3,
        outcome_after_s=0.1,
    )
    await nursery.start(Node(config, store).run)
    await wait_for(lambda: store.stat(1) and store.stat(1).state == BlobState.COMMITTED)
    await wait_for(lambda: store.stat(2) is None and store.stat(3) is None)
    assert coordinator.asked.count(1) == 3 and 3 not in coordinator.asked
    assert store.read_chunk(1, 1)[0] == data[CHUNK_SIZE:]


# ---------------------------------------------------------------- the process


async def read_line(stream: trio.abc.ReceiveStream, timeout: float = 15.0) -> bytes:
    buf = b""
    with trio.fail_after(timeout):
        while b"\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            buf += chunk
    return buf


def node_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "storage_node.main", *args]


async def test_process_prints_ready_line_and_stops_cleanly_on_sigterm(
    tmp_path: Path, secret_file: Path
) -> None:
    cmd = node_cmd("--data", str(tmp_path / "n"), "--secret-file", str(secret_file))
    cmd += ["--listen", "127.0.0.1:0", "--coordinator", f"127.0.0.1:{free_port()}"]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO
    )
    try:
        line = (await read_line(proc.stdout)).decode()
        assert line.startswith("dfs node listening on 127.0.0.1:"), line
        address = line.split()[-1]
        peer = Peer(address, secret_file.read_bytes().strip())
        await peer.call("stage", txid=1, index=0, data=b"hi")
        assert (await peer.call("node_info"))["blobs"] == 1
        await peer.aclose()
        # A second node on the same data dir is refused.
        second = await trio.run_process(
            node_cmd("--data", str(tmp_path / "n"), "--secret-file", str(secret_file)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
        assert second.returncode == 1 and b"in use" in second.stderr
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize("problem", ["data_is_a_file", "bad_secret", "bad_listen", "port_taken"])
async def test_startup_errors_are_one_line_and_exit_1(
    tmp_path: Path, secret_file: Path, problem: str
) -> None:
    data, secret, listen = tmp_path / "n", secret_file, "127.0.0.1:0"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    if problem == "data_is_a_file":
        data.write_text("not a directory")
    elif problem == "bad_secret":
        secret = tmp_path / "short"
        secret.write_text("too short")
    elif problem == "bad_listen":
        listen = "nonsense"
    else:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
    result = await trio.run_process(
        node_cmd("--data", str(data), "--secret-file", str(secret), "--listen", listen),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=REPO,
    )
    taken.close()
    assert result.returncode == (2 if problem == "bad_listen" else 1)  # bad usage: exit 2
    errors = [ln for ln in result.stderr.decode().splitlines() if ln.startswith("dfs node:")]
    assert len(errors) == 1 and b"Traceback" not in result.stderr, result.stderr
