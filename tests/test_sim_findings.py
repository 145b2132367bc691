"""Bugs the simulator of the real servers found (issue 8), each pinned by a test on real
servers: a real CoordinatorService and real storage nodes in this process, over TCP.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from coord_helpers import SECRET, RunningNode, running_coordinator, start_nodes

from dfs import rpc, runtime
from dfs.chunks import CHUNK_SIZE, chunk_digest, file_checksum
from dfs.client import Client
from dfs.db import install_environments
from dfs.errors import Code, DfsError
from dfs.sim.lmdb_model import SimDisks

RETENTION = 0.2


class _InlineHost(runtime.Host):
    """Worker calls on the trio thread, as in the simulator (the LMDB model is not
    thread-safe); the wall clock stays real."""

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)


@pytest.fixture
def model_disks() -> Iterator[SimDisks]:
    """Every store of the test on the simulator's LMDB model: a test can fill a node's disk."""
    disks = SimDisks()
    previous = install_environments(disks.open)
    host = runtime.install(_InlineHost())
    yield disks
    runtime.install(host)
    install_environments(previous)


async def _ended_and_purged(coord, txid: int) -> None:
    store = coord.store
    with trio.fail_after(10):
        while store.db.read(lambda t: store.txnlog.get(t, txid)) is not None:
            await trio.sleep(0.05)


@asynccontextmanager
async def _three_nodes(tmp_path: Path, **overrides: Any
                       ) -> AsyncIterator[tuple[Any, list[RunningNode], Client]]:
    """A real coordinator (with `overrides` of its config), three real nodes and a client."""
    async with running_coordinator(tmp_path / "coord", **overrides) as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3, capacity=1 << 30)
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            yield coord, nodes, client
        nursery.cancel_scope.cancel()


async def test_a_writer_asking_after_the_retention_hears_unknown_not_aborted(
        tmp_path: Path) -> None:
    """Seeds 2, 4, 5 and 8: a writer whose commit reply was lost (the coordinator crashed
    after its decision) asked OUTCOME after the record's retention, heard "aborted", reported
    the write as failed and wrote it again, while the first one had landed. Below the purge
    mark, "no record" proves nothing to a writer; a participant may still presume abort."""
    async with _three_nodes(tmp_path, txn_retention=RETENTION) as (coord, _, client):
        root = await client.resolve("/")
        attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
        first = await client.write_file(attr.ino, io.BytesIO(b"first"))
        await client.write_file(attr.ino, io.BytesIO(b"second"))  # first is not current
        await _ended_and_purged(coord, first.blob)
        assert await client.outcome(first.blob) == "unknown"
        driver = coord.service.driver
        assert driver.outcome(first.blob) == "aborted"  # a participant's question
        never = await driver.txids.allocate()  # above the mark: certainly no commit
        assert await client.outcome(never) == "aborted"


async def test_a_register_sent_again_after_a_lost_reply_keeps_one_id(tmp_path: Path) -> None:
    """A node whose first `register` reply was lost sent it again with node_id 0 and got a
    second id; the ghost id stayed in the node table, was placed replicas while it looked up,
    and kept GC entries nobody could deliver. The store's token makes the retry idempotent."""
    async with running_coordinator(tmp_path / "coord") as coord:
        fields = dict(node_id=0, address="127.0.0.1:9", capacity=1 << 30, used=0,
                      token="ab" * 16)
        first = await coord.call("register", **fields)
        again = await coord.call("register", **fields)
        other = await coord.call("register", **{**fields, "token": "cd" * 16})
        assert again["node_id"] == first["node_id"] != other["node_id"]
        assert len(coord.service.membership.nodes) == 2


async def _until(predicate: Any, seconds: float, what: str) -> None:
    with trio.move_on_after(seconds):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {seconds} s: {what}")


async def test_a_drop_that_failed_on_a_full_disk_is_tried_again(
        tmp_path: Path, model_disks: SimDisks) -> None:
    """Seeds 1 and 3: a node decided to drop a leftover (a STAGED txid the coordinator does
    not know; a PREPARED one whose OUTCOME is aborted) while its disk was full. The drop
    failed, but the participant had already forgotten the txid, so nothing ever tried again:
    the leftovers stayed until a restart, long after the disk had room."""
    data = b"leftover bytes"
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        node: RunningNode = (await start_nodes(nursery, coord, 1, capacity=1 << 30,
                                               outcome_after_s=0.2))[0]
        staged, prepared = 1_000_001, 1_000_002  # txids this coordinator never opened
        peer = rpc.Peer(node.address, SECRET)
        try:
            for txid in (staged, prepared):
                await peer.call("stage", txid=txid, index=0, data=data)
            await peer.call("prepare", txid=prepared, size=len(data),
                            checksum=file_checksum(data), nchunks=1)
        finally:
            await peer.aclose()
        participant, store = node.node.participant, node.node.store
        model_disks.set_full(str(node.node.config.data), True)
        await _until(lambda: participant.aborted(staged) and participant.aborted(prepared),
                     10, "the node decides to drop both")
        assert store.stat(staged) is not None and store.stat(prepared) is not None
        model_disks.set_full(str(node.node.config.data), False)
        await _until(lambda: store.stat(staged) is None and store.stat(prepared) is None, 5,
                     "the node drops both once its disk has room")
        nursery.cancel_scope.cancel()


async def test_a_repair_copy_whose_decision_was_lost_is_dropped_not_committed(
        tmp_path: Path) -> None:
    """Seeds 5 and 9: a repair fetched and PREPAREd a file's blob on a new node, then the
    coordinator crashed before the repair's decision. The node asked OUTCOME of the blob,
    heard "committed" (the file's write did commit, under the same txid) and committed a
    copy no file lists; GC never deletes it (it only knows listed replicas): an orphan for
    ever. The answer to a participant is about its own copy: listed, or presumed aborted."""
    data = b"the file's bytes"
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 4, capacity=1 << 30, outcome_after_s=0.2)
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            root = await client.resolve("/")
            attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
            attr = await client.write_file(attr.ino, io.BytesIO(data))
        assert attr.blob is not None
        (spare,) = [n for n in nodes if n.node_id not in attr.replicas]
        sources = [n.address for n in nodes if n.node_id in attr.replicas]
        fields = dict(size=len(data), checksum=file_checksum(data), nchunks=1)
        peer = rpc.Peer(spare.address, SECRET)
        try:  # the repair's STAGE and PREPARE on the new node; then the coordinator "crashed"
            await peer.call("fetch", blob=attr.blob, sources=sources, **fields)
            await peer.call("prepare", txid=attr.blob, **fields)
        finally:
            await peer.aclose()
        store = spare.node.store
        # One read per look: the node may drop the copy between two (CI: None.state).
        await _until(lambda: (info := store.stat(attr.blob)) is None or
                     str(info.state) == "COMMITTED", 10, "the new node settles its copy")
        assert store.stat(attr.blob) is None, "an unlisted copy was committed: an orphan"
        driver = coord.service.driver
        assert driver.outcome(attr.blob, node=attr.replicas[0]) == "committed"
        assert driver.outcome(attr.blob, node=spare.node_id) == "aborted"
        assert driver.outcome(attr.blob) == "committed"  # the file's write did commit
        nursery.cancel_scope.cancel()


async def test_a_node_that_dies_during_a_deep_check_is_a_note_not_a_crash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 12: a node went down between the listing and the deep verification; its
    `verify` failed with PeerUnavailable inside the checker's nursery, and `dfs check --deep
    --repair` died with a raw ExceptionGroup (a traceback in the CLI). The check must finish:
    that node's copies are reported as not re-hashed."""
    from dfs.checker import run_check
    from dfs.cli.check import print_report

    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3, capacity=1 << 30)
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            root = await client.resolve("/")
            attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
            await client.write_file(attr.ino, io.BytesIO(b"bytes to re-hash"))
            victim = nodes[0]

            def progress(phase: str, done: int, total: int | None) -> None:
                if phase == "verify" and done == 0:
                    victim.stop()  # down after it was listed, before it re-hashes

            report = await run_check(client, deep=True, repair=True, progress=progress)
        assert any(f"node {victim.node_id}" in note and "not re-hashed" in note
                   for note in report.notes), report.notes
        assert report.verified_bytes == 2 * len(b"bytes to re-hash")
        print_report(report)
        out = capsys.readouterr().out
        assert f"note: node {victim.node_id}" in out and "Traceback" not in out
        nursery.cancel_scope.cancel()


async def test_a_repair_target_that_stalls_its_vote_costs_a_vote_timeout_not_30_s(
        tmp_path: Path) -> None:
    """Seeds 194 and 196: a repair target's PREPARE (or fetch) reply was lost and the repair
    waited a fixed 30 s for it, holding the file's repair lock and keeping the blob "in
    flight", so the target's PREPARED copy outlived the file's version and every cleanup
    window. A repair's vote is bounded like a write's (vote_timeout plus the time to hash
    the blob); the stalled target's copy is aborted."""
    from dfs import failpoints

    data = b"to be copied"
    async with running_coordinator(tmp_path / "coord", vote_timeout=0.3) as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 4, capacity=1 << 30)
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            root = await client.resolve("/")
            attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
            attr = await client.write_file(attr.ino, io.BytesIO(data))
        (spare,) = [n for n in nodes if n.node_id not in attr.replicas]
        gone = next(n for n in nodes if n.node_id == attr.replicas[0])
        gone.stop()
        membership = coord.service.membership
        await _until(lambda: not membership.is_live(gone.node_id), 5, "the node is down")
        failpoints.arm("node.before_vote=delay:8000")  # the target's vote never comes in time
        try:
            started = trio.current_time()
            result = await coord.service.replicator.fix(attr.ino, attr.blob,
                                                        evacuate_down=True)
            took = trio.current_time() - started
        finally:
            failpoints.arm("")
        assert took < 0.3 + 3.0 + 1.5, f"the repair waited {took:.1f} s for a stalled vote"
        assert result.status == "failed" and spare.node_id not in result.replicas
        store = spare.node.store
        await _until(lambda: store.stat(attr.blob) is None, 5, "the stalled copy is aborted")
        nursery.cancel_scope.cancel()


class _StallingSource(rpc.Service):
    """A replica that serves chunk 0 of a blob and never answers for chunk 1 (a stuck disk or
    a half-open link): a fetch from it hangs for the node's read timeout."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk

    async def op_read(self, req: rpc.Request) -> dict[str, Any]:
        if req.int("index") == 0:
            return {"data": self.chunk, "digest": chunk_digest(self.chunk)}
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_fetch_that_fails_is_an_error_reply_and_a_stuck_one_stops_no_heartbeat(
        tmp_path: Path) -> None:
    """Seed 58: a repair's fetch on a node stalled on a silent source; the coordinator gave
    the repair up, the node named the half-fetched STAGED txid in its heartbeat, heard
    "unknown", and the heartbeat loop waited for that txid's lock, which the fetch held: no
    heartbeat for 20 s, the node marked down, under-replicated files, GC deletions not
    delivered. When the fetch finally failed its UNAVAILABLE came out of the pull's nursery as
    an ExceptionGroup and was answered INTERNAL. A busy txid is not an idle leftover: the
    heartbeat skips it; a failed fetch answers its own error."""
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        (node,) = await start_nodes(nursery, coord, 1, capacity=1 << 30)
        peer = rpc.Peer(node.address, SECRET)
        chunk = b"c" * CHUNK_SIZE
        fields = dict(size=2 * CHUNK_SIZE, checksum=file_checksum(chunk + chunk), nchunks=2)
        with pytest.raises(DfsError) as refused:  # a source that refuses connections
            await peer.call("fetch", blob=1_000_003, sources=["127.0.0.1:1"], **fields)
        assert refused.value.code is Code.UNAVAILABLE, refused.value

        listeners = await nursery.start(rpc.serve, _StallingSource(chunk), "127.0.0.1", 0,
                                        SECRET, lambda: coord.store.cluster_id)
        source = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        stuck = 1_000_004  # a repair the coordinator no longer knows (it gave up)

        async def fetch() -> None:
            with pytest.raises(DfsError):
                await peer.call("fetch", blob=stuck, sources=[source], timeout=60, **fields)

        nursery.start_soon(fetch)
        store, membership = node.node.store, coord.service.membership
        await _until(lambda: store.stat(stuck) is not None, 5, "chunk 0 is staged")
        with trio.move_on_after(4.0):  # leftover age (2 s) + named + node_timeout (1 s)
            while membership.is_live(node.node_id):
                await trio.sleep(0.05)
            raise AssertionError("the node's heartbeats stopped behind the stuck fetch")
        await peer.aclose()
        nursery.cancel_scope.cancel()


class _LostAfterOutcome:
    """The client's link to the coordinator, with the network's faults of seed 20183: the
    commit's reply is lost (the request reached the coordinator), and right after OUTCOME
    answers, the coordinator is unreachable for `down_s` (it crashed and came back)."""

    def __init__(self, link: Any, down_s: float) -> None:
        self.link = link
        self.down_s = down_s
        self.down_until = 0.0
        self.sent: list[str] = []

    async def call(self, op: str, **fields: Any) -> Any:
        self.sent.append(op)
        if trio.current_time() < self.down_until:
            raise rpc.PeerUnavailable("coordinator: connection refused")
        reply = await self.link.call(op, **fields)
        if op in ("commit", "commit_txn"):
            raise rpc.PeerUnavailable("coordinator: the reply was lost")
        if op == "outcome":
            self.down_until = trio.current_time() + self.down_s
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self.link, name)


@pytest.mark.parametrize("shape", ["write_file", "transaction"])
async def test_a_write_outcome_said_committed_is_never_retried_or_reported_failed(
        tmp_path: Path, shape: str) -> None:
    """Seed 20183: a three-file transaction's commit reply was lost; OUTCOME said committed;
    the coordinator then crashed, so reading the files back failed, and that failure was
    taken for the transaction's: it was retried, and in the end reported "failed after 4
    attempts" while its files had landed. Once OUTCOME says committed the write succeeded;
    reading back what it made is asked again while the coordinator comes back."""
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        await start_nodes(nursery, coord, 3, capacity=1 << 30)
        async with Client(coord.address, SECRET, retry_for=0.0, commit_timeout=10.0) as client:
            root = await client.resolve("/")
            a = await client.create(root.ino, b"a", 0o100644, 0, 0)
            await client.create(root.ino, b"b", 0o100644, 0, 0)
            faulty = _LostAfterOutcome(client.coordinator, down_s=1.0)
            client.coordinator = faulty
            if shape == "write_file":
                attr = await client.write_file(a.ino, io.BytesIO(b"new a"), base_version=0,
                                               if_version=True)
                assert (attr.version, attr.size) == (1, 5)
            else:
                t = client.transaction()
                t.write("/a", b"new a", if_version=0)
                t.write("/b", b"new b", if_version=0)
                attrs = await t.commit()
                assert t.settled_by_outcome
                assert {p: a.version for p, a in attrs.items()} == {"/a": 1, "/b": 1}
            assert faulty.sent.count("begin") == (1 if shape == "write_file" else 2), \
                f"the write was sent again: {faulty.sent}"
            client.coordinator = faulty.link
            for name in ("/a", "/b")[: 1 if shape == "write_file" else 2]:
                assert (await client.resolve(name)).version == 1
        nursery.cancel_scope.cancel()


async def test_a_copy_of_a_superseded_blob_is_aborted_whatever_its_record_says(
        tmp_path: Path) -> None:
    """HA nemesis seeds 5, 23 and 25: a repair re-made a copy on a node of the blob's
    decision (the node had refused its COMMIT), the file moved on and GC deleted the listed
    copies, then the repair's copy was PREPARED there and its node asked OUTCOME: the
    decision's record still listed the node, the answer was "committed", and the node kept a
    blob no file names, for ever. A participant's copy is committed only while the namespace
    lists it."""
    async with _three_nodes(tmp_path) as (coord, _, client):
        root = await client.resolve("/")
        attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
        first = await client.write_file(attr.ino, io.BytesIO(b"first"))
        assert first.blob is not None
        driver, node = coord.service.driver, first.replicas[0]
        assert driver.outcome(first.blob, node=node) == "committed"
        await client.write_file(attr.ino, io.BytesIO(b"second"))
        store = coord.store
        record = store.db.read(lambda t: store.txnlog.get(t, first.blob))
        assert record is not None and node in record.replicas  # it still names the node
        assert driver.outcome(first.blob, node=node) == "aborted"
        assert driver.outcome(first.blob) == "committed"  # to its writer: it did commit
