"""`dfs check` streams in pages (docs/checker.md, "Memory"): with a tiny page every walk crosses
many page boundaries and the check still finds exactly what was planted; what the merge holds
at once never exceeds a page per stream; `dfs check PATH` reads only that subtree."""

from __future__ import annotations

import io
import os
import struct

import trio
from checker_helpers import (
    COORDINATOR_ARGS,
    NODE_ARGS,
    check,
    edit_coordinator,
    node_call,
    put_files,
    stat,
    unlink_raw,
)

from dfs.checker import namespace, run_check
from dfs.chunks import file_checksum

ORPHAN_TXID = 10**9  # never allocated: the last blob id any listing holds
PAGE = 7


def plant_orphan(cluster, name: str, txid: int = ORPHAN_TXID) -> None:
    """A COMMITTED blob no file lists, committed on the node behind the coordinator's back."""
    data = b"nobody's bytes"
    node_call(cluster, name, "stage", txid=txid, index=0, data=data)
    node_call(cluster, name, "prepare", txid=txid, size=len(data),
              checksum=file_checksum(data), nchunks=1)
    node_call(cluster, name, "commit", txid=txid)


def drop_replica(cluster, path: str, which: int) -> tuple[int, int]:
    """Delete one listed copy of the file on its node: (node id, blob)."""
    a = stat(cluster, path)
    node = a["replicas"][which]
    assert node_call(cluster, cluster.node_name(node), "delete", blobs=[a["blob"]])["deleted"] == 1
    return node, a["blob"]


def found(doc) -> set[tuple]:
    return {(f["kind"], f["path"], f["node"], f["blob"]) for f in doc["findings"]}


def test_a_tiny_page_finds_exactly_the_planted_faults_across_page_boundaries(
        cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    put_files(cluster, 50)
    expected: set[tuple] = set()
    for path, which in (("/f5", 0), ("/f40", 2)):
        node, blob = drop_replica(cluster, path, which)
        expected.add(("missing_replica", path, node, blob))
    orphan_node = cluster.node_names[3]
    plant_orphan(cluster, orphan_node)
    expected.add(("orphan_blob", None, cluster.node_id(orphan_node), ORPHAN_TXID))
    # /f25's inode and entry vanish: its copies, mid-way through every listing, are orphans.
    gone = stat(cluster, "/f25")
    cluster.stop("coordinator")

    def damage(txn, dbs) -> None:
        assert unlink_raw(txn, dbs, 1, b"f25") == gone["ino"]
        assert txn.delete(struct.pack(">Q", gone["ino"]), db=dbs["inodes"])

    edit_coordinator(cluster, damage)
    cluster.restart("coordinator")
    expected |= {("orphan_blob", None, n, gone["blob"]) for n in gone["replicas"]}
    rotten = stat(cluster, "/f20")
    victim = cluster.node_name(rotten["replicas"][1])
    cluster.stop(victim)
    cluster.corrupt_chunk(victim, rotten["blob"])
    cluster.restart(victim)
    deep = {("corrupt_chunk", "/f20", rotten["replicas"][1], rotten["blob"])}

    status, doc = check(cluster, "--page-size", str(PAGE))
    assert status == 3
    assert found(doc) == expected, doc["findings"]
    assert doc["files"] == 49 and doc["findings_total"] == len(expected)
    memory = doc["memory"]
    assert memory["page"] == PAGE
    assert 0 < memory["peak_stream"] <= PAGE, memory
    assert memory["peak_held"] <= PAGE * (1 + 4), memory

    status, doc = check(cluster, "--deep", "--page-size", str(PAGE))
    assert status == 3 and found(doc) == expected | deep, doc["findings"]

    status, doc = check(cluster, "--deep", "--repair", "--page-size", str(PAGE))
    assert status == 0 and all(f["fixed"] for f in doc["findings"]), doc["findings"]
    cluster.wait_until(lambda: check(cluster, "--deep")[0] == 0, timeout=15,
                       message="a clean check after the repair (orphans collected)")


def test_the_merge_never_holds_more_than_a_page_per_stream(cluster_factory, monkeypatch
                                                           ) -> None:
    """The bound is counted inside the merge, per stream, not inferred from RSS; the namespace
    check, in ranges of 8 inode numbers here, still finds an unnamed inode and a dangling
    entry in any range."""
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    put_files(cluster, 30)
    x, y = stat(cluster, "/f3"), stat(cluster, "/f17")
    cluster.stop("coordinator")

    def damage(txn, dbs) -> None:
        assert txn.delete(struct.pack(">Q", x["ino"]), db=dbs["inodes"])  # /f3 dangles
        assert unlink_raw(txn, dbs, 1, b"f17") == y["ino"]  # /f17's inode has no name

    edit_coordinator(cluster, damage)
    cluster.restart("coordinator")
    monkeypatch.setattr(namespace, "NAMESPACE_RANGE", 8)

    async def go():
        async with cluster.client() as client:
            return await run_check(client, page=3)

    report = trio.run(go)
    kinds = {(f.kind.value, f.path, f.ino) for f in report.findings
             if f.kind.value in ("dangling_entry", "unlinked_inode")}
    assert kinds == {("dangling_entry", "/f3", x["ino"]), ("unlinked_inode", None, y["ino"])}
    assert {f.kind.value for f in report.findings} == {
        "dangling_entry", "unlinked_inode", "orphan_blob"}  # /f3's copies: no inode lists them
    assert report.files == 29
    assert report.memory["peak_stream"] <= 3, report.memory
    assert report.memory["peak_held"] <= 3 * (1 + 4), report.memory
    assert report.memory["namespace_passes"] >= 4, report.memory


def put_tree(cluster, layout: dict[str, int]) -> None:
    """Directories (value -1) and files of `size` bytes, in the order given."""

    async def go() -> None:
        async with cluster.client() as client:
            for path, size in layout.items():
                parent = await client.resolve(os.path.dirname(path))
                name = os.path.basename(path).encode()
                if size < 0:
                    await client.mkdir(parent.ino, name, 0o755, 0, 0)
                else:
                    attr = await client.create(parent.ino, name, 0o100644, 0, 0)
                    await client.write_file(attr.ino, io.BytesIO(os.urandom(size)))

    trio.run(go)


def test_check_path_reads_only_that_subtree(cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    layout = {"/sub": -1, "/sub/d": -1, **{f"/sub/s{i}": 100 + i for i in range(6)},
              **{f"/sub/d/x{i}": 200 + i for i in range(5)}, **{f"/r{i}": 300 + i for i in range(8)}}
    put_tree(cluster, layout)
    inside = drop_replica(cluster, "/sub/d/x3", 1)
    outside = drop_replica(cluster, "/r4", 0)
    plant_orphan(cluster, cluster.node_names[0])

    status, doc = check(cluster, "/sub", "--page-size", "3")
    assert status == 3
    assert found(doc) == {("missing_replica", "/sub/d/x3", *inside)}
    assert doc["files"] == 11 and doc["replicas"] == 33
    assert sum(n["blobs"] for n in doc["nodes"]) == 33 - 1, \
        "only the subtree's copies are asked about"
    assert any("orphan" in note and "whole file system" in note for note in doc["notes"])
    text = cluster.dfs("check", "/sub")
    assert text.returncode == 3 and b"whole file system" in text.stdout

    status, doc = check(cluster, "/sub/d/x3")
    assert status == 3 and found(doc) == {("missing_replica", "/sub/d/x3", *inside)}
    assert doc["files"] == 1
    status, doc = check(cluster, "/sub/s2")
    assert status == 0 and doc["files"] == 1

    status, doc = check(cluster)
    assert {("missing_replica", "/sub/d/x3", *inside), ("missing_replica", "/r4", *outside)} \
        <= found(doc)
    assert {f["kind"] for f in doc["findings"]} == {"missing_replica", "orphan_blob"}
