"""Bugs the simulator of the real servers found (issue 8), each pinned by a test on real
servers: a real CoordinatorService and real storage nodes in this process, over TCP.
"""

from __future__ import annotations

import io
from pathlib import Path

import trio
from coord_helpers import SECRET, running_coordinator, start_nodes

from dfs.client import Client

RETENTION = 0.2


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
