"""Bugs the simulator of the real servers found (issue 8), each pinned by a test on real
servers: a real CoordinatorService and real storage nodes in this process, over TCP.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from coord_helpers import SECRET, RunningNode, running_coordinator, start_nodes

from dfs import rpc, runtime
from dfs.chunks import file_checksum
from dfs.client import Client
from dfs.db import install_environments
from dfs.sim.lmdb_model import SimDisks
from storage_node.participant import TxState

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


async def test_a_writer_asking_after_the_retention_hears_unknown_not_aborted(
        tmp_path: Path) -> None:
    """Seeds 2, 4, 5 and 8: a writer whose commit reply was lost (the coordinator crashed
    after its decision) asked OUTCOME after the record's retention, heard "aborted", reported
    the write as failed and wrote it again, while the first one had landed. Below the purge
    mark, "no record" proves nothing to a writer; a participant may still presume abort."""
    async with running_coordinator(tmp_path / "coord", txn_retention=RETENTION) as coord, \
            trio.open_nursery() as nursery:
        await start_nodes(nursery, coord, 3, capacity=1 << 30)
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
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
        nursery.cancel_scope.cancel()


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
                                               outcome_after=0.2))[0]
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
        await _until(lambda: participant.state(staged) == participant.state(prepared)
                     == TxState.ABORTED, 10, "the node decides to drop both")
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
        nodes = await start_nodes(nursery, coord, 4, capacity=1 << 30, outcome_after=0.2)
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
        await _until(lambda: store.stat(attr.blob) is None or
                     str(store.stat(attr.blob).state) == "COMMITTED",  # type: ignore[union-attr]
                     10, "the new node settles its copy")
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
