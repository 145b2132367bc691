"""The ways a current replica used to be lost (issue 8, items 1-4), each on a real cluster.

Records are purged after a short `--txn-retention`, so every test runs in the situation that
broke: the file's transaction record is long gone while its blob is current. Each test fails
on the code before the fix (see the report of the change that added it).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import trio
from checker_helpers import all_stats, check, copy_ok, node_blobs, node_call, put_files, read_all
from cluster import COORDINATOR_ARGS, Cluster
from coord_helpers import SECRET, running_coordinator, start_nodes

from dfs import failpoints
from dfs.client import Client
from dfs.errors import Code, DfsError
from dfs.rpc import Peer

MiB = 1024 * 1024
RETENTION = 0.3
# Nodes ask OUTCOME about a PREPARED blob 0.2 s after preparing it (or at once after a restart).
NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "0.2", "--scrub-rate", "0")
SHORT_RETENTION = (*COORDINATOR_ARGS, "--txn-retention", str(RETENTION))
# Nodes that wait for the COMMIT rather than ask OUTCOME about a PREPARED blob.
PATIENT_NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "30", "--scrub-rate", "0")


def purged(cluster: Cluster) -> None:
    """Wait past the retention (and a GC pass): the file's ENDED record is gone."""
    time.sleep(RETENTION + 2.0)


def coordinator_call(cluster: Cluster, op: str, **fields: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        peer = Peer(cluster.coordinator, cluster.secret)
        try:
            return await peer.call(op, retry_for=5, **fields)
        finally:
            await peer.aclose()

    return trio.run(go)


def names_by_id(cluster: Cluster) -> dict[int, str]:
    return {cluster.node_id(name): name for name in cluster.node_names}


def test_repair_target_asking_outcome_keeps_its_copy(cluster_factory) -> None:
    """Item 1: a repair target that asks OUTCOME before the repair's decision (the file's own
    record purged long ago) must not hear "aborted" and drop the copy the repair then lists."""
    cluster = cluster_factory(
        node_args=NODE_ARGS, coordinator_args=SHORT_RETENTION,
        env={"coordinator": {"DFS_FAILPOINTS": "repair.before_decision=delay:1500"}})
    files = put_files(cluster, 1, big=2 * MiB)
    st = all_stats(cluster, list(files))["/f0"]
    purged(cluster)
    victim = names_by_id(cluster)[st["replicas"][1]]
    node_call(cluster, victim, "delete", blobs=[st["blob"]])

    status, doc = check(cluster, "--repair")
    assert status == 0, doc
    assert "failpoint repair.before_decision fires" in cluster.log("coordinator", 400)
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc["findings"]
    assert copy_ok(cluster, victim, st["blob"])
    assert read_all(cluster, list(files)) == files


def test_refused_commit_is_not_an_ack_the_replica_is_repaired(cluster_factory) -> None:
    """Item 2: a replica that refuses COMMIT (here: it was told "aborted" and dropped its
    PREPARED copy) owes its ack still; the coordinator repairs it, and only then ends."""
    cluster = cluster_factory(
        node_args=NODE_ARGS, coordinator_args=SHORT_RETENTION,
        env={"coordinator": {"DFS_FAILPOINTS": "coordinator.mid_commit=delay:3000"}})
    by_id = names_by_id(cluster)
    files = put_files(cluster, 1, big=MiB)  # returns at the decision; COMMITs follow slowly
    st = all_stats(cluster, list(files))["/f0"]
    victim = by_id[st["replicas"][1]]  # the first replica gets COMMIT at once, this one later
    node_call(cluster, victim, "abort", txid=st["blob"])
    assert st["blob"] not in node_blobs(cluster, victim)

    cluster.wait_until(lambda: node_blobs(cluster, victim).get(st["blob"]) == "COMMITTED",
                       timeout=30, message="the refused replica re-made and committed")
    assert copy_ok(cluster, victim, st["blob"])
    cluster.wait_until(lambda: not coordinator_call(cluster, "txn_list")["txns"], timeout=10,
                       message="the record ended once every replica acked")
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc["findings"]


def test_checker_cannot_delete_a_current_copy_after_its_record_is_purged(
        cluster_factory) -> None:
    """Item 3: whether a copy is current comes from the namespace, not from the (purged)
    transaction record; `forget_blobs` keeps a copy an inode lists."""
    cluster = cluster_factory(node_args=NODE_ARGS, coordinator_args=SHORT_RETENTION)
    files = put_files(cluster, 1)
    st = all_stats(cluster, list(files))["/f0"]
    purged(cluster)
    node, blob = st["replicas"][0], st["blob"]
    refs = coordinator_call(cluster, "blob_refs", blobs=[[node, blob]])["refs"]
    assert refs == ["current"]
    reply = coordinator_call(cluster, "forget_blobs", node_id=node, blobs=[blob])
    assert reply["queued"] == [] and reply["kept"] == [[blob, "current"]]
    time.sleep(1.5)  # a GC pass or more
    assert blob in node_blobs(cluster, names_by_id(cluster)[node])
    status, doc = check(cluster)
    assert status == 0 and doc["clean"], doc["findings"]


async def test_gc_never_deletes_a_copy_a_repair_is_listing(tmp_path: Path) -> None:
    """Item 4: a GC entry for (node, blob) that falls due while a repair is copying the blob
    to that node (an old entry from when the node was dropped from the list) must not delete
    the copy the repair's decision lists."""
    failpoints.arm("repair.before_decision=delay:1500")
    try:
        async with running_coordinator(tmp_path / "coord", txn_retention=RETENTION) as coord, \
                trio.open_nursery() as nursery:
            nodes = await start_nodes(nursery, coord, 4, capacity=1 << 30)
            data = bytes(range(256)) * 4096
            async with Client(coord.address, SECRET, retry_for=10.0) as client:
                root = await client.resolve("/")
                attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(data))
                attr = await client.resolve("/f")
            blob, listed = attr.blob, list(attr.replicas)
            by_id = {n.node_id: n for n in nodes}
            spare = next(n for n in by_id if n not in listed)
            by_id[listed[2]].stop()  # its copy is to be replaced by one on the spare node
            await trio.sleep(coord.service.config.node_timeout + 0.5)

            async def repair(results: list[Any]) -> None:
                results.append(await coord.service.replicator.fix(
                    attr.ino, blob, [listed[2]], evacuate_down=True))

            results: list[Any] = []
            nursery.start_soon(repair, results)
            spare_store = by_id[spare].node.store
            with trio.fail_after(10):
                while (info := spare_store.stat(blob)) is None or info.state.value != "PREPARED":
                    await trio.sleep(0.02)
            store = coord.store
            await store.db.write(lambda t: store.gc.add(t, 0, spare, blob, attr.ino))
            with trio.fail_after(20):
                while not results:
                    await trio.sleep(0.05)
            assert results[0].status == "fixed" and spare in results[0].replicas, results[0]

            def entry_left() -> bool:
                return any(e.node == spare and e.blob == blob for e in store.db.read(store.gc.all))

            with trio.fail_after(10):  # the GC had its chance; the copy is committed, intact
                while entry_left() or (info := spare_store.stat(blob)) is None or \
                        info.state.value != "COMMITTED":
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        failpoints.arm("")


def test_lost_prepared_copy_refuses_commit_and_is_re_made(cluster_factory) -> None:
    """Issue 8 follow-up: a node that lost its PREPARED copy before the COMMIT arrived must
    refuse it (ENOENT), not ack a COMMIT it cannot honour; the coordinator then re-makes the
    copy, and the file ends with R good replicas."""
    cluster = cluster_factory(
        node_args=PATIENT_NODE_ARGS, coordinator_args=SHORT_RETENTION,
        env={"coordinator": {"DFS_FAILPOINTS": "coordinator.mid_commit=delay:6000"}})
    files = put_files(cluster, 1, big=MiB)  # returns at the decision; COMMITs follow slowly
    st = all_stats(cluster, list(files))["/f0"]
    victim = names_by_id(cluster)[st["replicas"][1]]  # COMMIT reaches it 6 s from now
    assert node_blobs(cluster, victim)[st["blob"]] == "PREPARED"
    node_call(cluster, victim, "delete", blobs=[st["blob"]])  # the copy is lost

    cluster.wait_until(lambda: node_blobs(cluster, victim).get(st["blob"]) == "COMMITTED",
                       timeout=30, message="the lost copy re-made and committed")
    assert copy_ok(cluster, victim, st["blob"])
    cluster.wait_until(lambda: not coordinator_call(cluster, "txn_list")["txns"], timeout=10,
                       message="the record ended once every replica acked")
    assert len(all_stats(cluster, list(files))["/f0"]["replicas"]) == 3
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc["findings"]
    assert read_all(cluster, list(files)) == files


def test_commit_redelivered_after_gc_deleted_a_superseded_copy_ends(cluster_factory) -> None:
    """The refusal of a COMMIT for a blob GC already deleted (a later write superseded it
    before the COMMIT reached this node) is released: the old record ends, and the old blob
    is not re-made anywhere."""
    cluster = cluster_factory(
        node_args=PATIENT_NODE_ARGS, coordinator_args=SHORT_RETENTION,
        env={"coordinator": {"DFS_FAILPOINTS": "coordinator.mid_commit=delay:6000"}})
    files = put_files(cluster, 1)
    old = all_stats(cluster, list(files))["/f0"]
    victim = names_by_id(cluster)[old["replicas"][1]]  # its COMMIT of v1 comes 6 s later
    assert node_blobs(cluster, victim)[old["blob"]] == "PREPARED"

    async def overwrite() -> bytes:
        data = b"version two" * 100
        async with cluster.client() as client:
            attr = await client.resolve("/f0")
            await client.write_file(attr.ino, io.BytesIO(data))
        return data

    files["/f0"] = trio.run(overwrite)
    new = all_stats(cluster, list(files))["/f0"]
    assert new["blob"] != old["blob"]
    node_call(cluster, victim, "delete", blobs=[old["blob"]])  # as GC does, superseded

    def old_record_gone() -> bool:
        return all(t["txid"] != old["blob"] for t in coordinator_call(cluster, "txn_list")["txns"])

    cluster.wait_until(old_record_gone, timeout=15, message="the superseded record ended")
    assert "not here; COMMIT refused" in cluster.log("coordinator", 400)  # refused, released
    cluster.wait_until(lambda: not coordinator_call(cluster, "txn_list")["txns"], timeout=15,
                       message="every record ended")
    time.sleep(1.0)  # a repair pass or more: none may re-make the superseded copy
    assert old["blob"] not in node_blobs(cluster, victim)
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc["findings"]
    assert read_all(cluster, list(files)) == files


async def test_a_replica_that_keeps_refusing_commit_is_repaired_with_backoff(
        tmp_path: Path, caplog) -> None:
    """A replica whose COMMIT is refused again after every repair must not be re-repaired at
    once each time (a tight loop of fetch + decision writes): its repairs back off, and the
    coordinator says so once. Once the node accepts the COMMIT again the record ends."""
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3, capacity=1 << 30)
        # R=3 of 3 nodes: every node holds a replica. The victim refuses every COMMIT from
        # the start, so the write's own COMMIT is refused while its decision is still live
        # (a COMMIT re-sent after the record ended would be ignored: nothing owes it).
        victim = nodes[0].node.service
        assert victim is not None
        real_commit, refusals = victim.op_commit, []

        async def full_disk_commit(req: Any) -> dict[str, Any]:
            refusals.append(trio.current_time())
            raise DfsError(Code.ENOSPC, "disk full: no room for the COMMIT")

        victim.op_commit = full_disk_commit
        worker = coord.service.repair_worker
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            root = await client.resolve("/")
            attr = await client.create(root.ino, b"f", 0o100644, 0, 0)
            await client.write_file(attr.ino, io.BytesIO(b"some bytes" * 1000))
            attr = await client.resolve("/f")
        assert nodes[0].node_id in attr.replicas
        await trio.sleep(4.0)
        assert worker.fixed >= 1, "the refused replica was repaired"
        assert len(refusals) <= 3, f"{len(refusals)} refusals in 4 s: no backoff"
        warnings = [r for r in caplog.records if "keeps refusing COMMIT" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]

        victim.op_commit = real_commit
        with trio.fail_after(15):
            while coord.service.driver.protocol.phase(attr.blob) is not None \
                    or worker.pending():
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_a_refused_txid_in_a_commit_batch_marks_only_its_replica_bad(
        tmp_path: Path, caplog) -> None:
    """COMMITs of several transactions reach a node in one request (docs/design.md §5). One of
    them refuses (GC deleted that PREPARED copy: ENOENT): the others are acked and end, and
    only the refusing (txid, node) is marked bad and repaired."""
    async with running_coordinator(tmp_path / "coord") as coord, \
            trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, coord, 3, capacity=1 << 30)  # R=3: all replicas
        victim = nodes[0].node.service
        assert victim is not None
        real_commit, requests, gate = victim.op_commit, [], trio.Event()

        async def held_commit(req: Any) -> dict[str, Any]:
            """The node's own op; only its first request waits, so the next ones queue."""
            requests.append(sorted(req.msg.get("txids") or [req.msg["txid"]]))
            if len(requests) == 1:
                await gate.wait()
            return await real_commit(req)

        victim.op_commit = held_commit
        async with Client(coord.address, SECRET, retry_for=10.0) as client:
            root = await client.resolve("/")
            blobs = []
            for i in range(5):
                attr = await client.create(root.ino, b"f%d" % i, 0o100644, 0, 0)
                blobs.append((await client.write_file(attr.ino, io.BytesIO(b"%d" % i * 99))).blob)
        lost = blobs[2]
        driver = coord.service.driver
        # A write returns at its decision; its COMMIT reaches the victim's outbox only after
        # the first replica's ack (when the victim is not first). Wait until all four queue
        # behind the held request, or the batch under test would be sent without the last.
        with trio.fail_after(10):
            while driver.queued_to(nodes[0].node_id) < len(blobs) - 1:
                await trio.sleep(0.01)
        peer = Peer(nodes[0].address, SECRET)
        await peer.call("delete", blobs=[lost])  # as GC would: the PREPARED copy is gone
        await peer.aclose()
        gate.set()
        with trio.fail_after(10):
            while any(driver.protocol.phase(b) is not None for b in blobs if b != lost):
                await trio.sleep(0.05)
        assert requests[:2] == [[blobs[0]], sorted(blobs[1:])], requests
        bad = [r.getMessage() for r in caplog.records if "queued for repair" in r.getMessage()]
        assert len(bad) == 1 and bad[0].startswith(
            f"node {nodes[0].node_id} refused COMMIT: blob {lost} not here"), bad
        assert f"of txid {lost} " in bad[0]
        for blob in blobs:
            if blob != lost:
                assert victim.store.stat(blob).state.value == "COMMITTED"
        # The refused replica is repaired and its COMMIT acked: the record ends too.
        with trio.fail_after(15):
            while driver.protocol.phase(lost) is not None:
                await trio.sleep(0.1)
        assert victim.store.stat(lost).state.value == "COMMITTED"
        nursery.cancel_scope.cancel()

