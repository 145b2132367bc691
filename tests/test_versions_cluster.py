"""Version history on a real cluster (docs/coordinator.md, "Version history"): the CLI lists,
reads and restores kept versions; the GC deletes a version's copies only when nothing names
them; a removed node's copies of kept versions are re-made elsewhere."""

from __future__ import annotations

import io
import json
import time

import trio
from checker_helpers import check, edit_coordinator, node_blobs
from cluster import COORDINATOR_ARGS, Cluster

from dfs.meta.codec import U64x3

KEEP = (*COORDINATOR_ARGS, "--keep-versions", "2")


def put(cluster: Cluster, path: str, data: bytes) -> dict:
    done = cluster.dfs("put", "-", path, "--json", input=data)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def history(cluster: Cluster, path: str) -> list[dict]:
    return cluster.dfs_json("versions", path)["versions"]


def on_nodes(cluster: Cluster, blob: int) -> int:
    return sum(blob in node_blobs(cluster, f"node-{i}") for i in (1, 2, 3))


def test_versions_are_listed_read_restored_and_collected_only_when_unnamed(
        cluster_factory) -> None:
    cluster = cluster_factory(coordinator_args=KEEP)
    blobs = {}
    for n in (1, 2, 3, 4):
        blobs[n] = put(cluster, "/f", f"content {n}".encode() * 100)["blob"]
    rows = history(cluster, "/f")
    assert [(r["version"], r["current"]) for r in rows] == [(4, True), (3, False), (2, False)]
    assert [r["txid"] for r in rows] == [blobs[4], blobs[3], blobs[2]]
    assert all(r["size"] == len(b"content 1") * 100 for r in rows)
    assert cluster.dfs("cat", "/f", "--version", "2").stdout == b"content 2" * 100
    old = cluster.dfs("cat", "/f", "--version", "1")
    assert old.returncode == 1 and old.stderr.count(b"\n") == 1
    assert b"no version 1" in old.stderr, old.stderr
    # Version 1 fell off the history: its copies go after the grace; the kept ones stay.
    cluster.wait_until(lambda: on_nodes(cluster, blobs[1]) == 0, timeout=15,
                       message="version 1's copies collected")
    assert on_nodes(cluster, blobs[2]) == on_nodes(cluster, blobs[3]) == 3

    restored = cluster.dfs("restore", "/f", "--version", "2", "--json")
    assert restored.returncode == 0, restored.stderr
    doc = json.loads(restored.stdout)
    assert (doc["version"], doc["blob"]) == (5, blobs[2])  # the blob is shared, not copied
    assert cluster.dfs("cat", "/f").stdout == b"content 2" * 100
    assert [r["version"] for r in history(cluster, "/f")] == [5, 4, 3]

    # Version 2 left the history with the restore; its blob is current, so it stays.
    put(cluster, "/f", b"content 6")  # history: 6, 5 (blob 2), 4; 3 is dropped
    assert [r["version"] for r in history(cluster, "/f")] == [6, 5, 4]
    cluster.wait_until(lambda: on_nodes(cluster, blobs[3]) == 0, timeout=15,
                       message="version 3's copies collected")
    assert on_nodes(cluster, blobs[2]) == 3
    assert cluster.dfs("cat", "/f", "--version", "5").stdout == b"content 2" * 100
    status, found = check(cluster, "--deep")
    assert status == 0 and found["findings"] == [], found["findings"]

    # Deleting the file deletes its history (and, after the grace, every copy of it).
    assert cluster.dfs("rm", "/f").returncode == 0
    cluster.wait_until(lambda: on_nodes(cluster, blobs[2]) + on_nodes(cluster, blobs[4]) == 0,
                       timeout=15, message="the deleted file's versions collected")


def test_a_directory_xattr_sets_how_many_versions_its_files_keep(cluster_factory) -> None:
    cluster = cluster_factory(coordinator_args=KEEP)
    assert cluster.dfs("mkdir", "/none").returncode == 0
    assert cluster.dfs("mkdir", "/many").returncode == 0

    async def policies() -> None:
        async with cluster.client() as client:
            for path, keep in (("/none", b"0"), ("/many", b"5")):
                attr = await client.resolve(path)
                await client.setxattr(attr.ino, b"user.dfs.keep_versions", keep)

    trio.run(policies)
    for n in range(7):
        put(cluster, "/none/f", f"{n}".encode())
        put(cluster, "/many/f", f"{n}".encode())
    assert len(history(cluster, "/none/f")) == 1
    assert [r["version"] for r in history(cluster, "/many/f")] == [7, 6, 5, 4, 3, 2]
    bad = cluster.dfs("restore", "/many/f", "--version", "99")
    assert bad.returncode == 1 and b"no version 99" in bad.stderr


def test_kept_versions_on_a_removed_node_are_made_again_elsewhere(cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, coordinator_args=KEEP)

    async def write_versions() -> None:
        """The 18 writes through the library, in one process (the CLI is proved above)."""
        async with cluster.client() as client:
            root = await client.resolve("/")
            for n in range(3):
                for i in range(6):
                    if n == 0:
                        await client.create(root.ino, f"g{i}".encode(), 0o100644, 0, 0)
                    ino = (await client.resolve(f"/g{i}")).ino
                    await client.write_file(ino, io.BytesIO(
                        f"file {i} version {n}".encode() * 50))

    trio.run(write_versions)
    gone = cluster.node_id("node-4")
    held = [(f"/g{i}", r["version"]) for i in range(6) for r in history(cluster, f"/g{i}")
            if gone in r["replicas"] and not r["current"]]
    assert held, "placement put no kept version on node-4"
    removed = cluster.dfs("node", "remove", str(gone), "--json", timeout=60)
    assert removed.returncode == 0, removed.stderr
    cluster.stop("node-4")
    for i in range(6):
        for r in history(cluster, f"/g{i}"):
            assert gone not in r["replicas"] and len(set(r["replicas"])) == 3, r
    for path, version in held:
        n = version - 1
        read = cluster.dfs("cat", path, "--version", str(version))
        assert read.stdout == f"file {path[2:]} version {n}".encode() * 50, read.stderr


def test_the_checker_finds_and_repairs_copies_of_kept_versions_and_snapshots(
        cluster_factory) -> None:
    from replica_damage import delete_blob, rewrite_chunk

    cluster = cluster_factory(coordinator_args=KEEP)
    kept = put(cluster, "/k", b"kept version " * 400)["blob"]
    put(cluster, "/k", b"current")
    assert cluster.dfs("mkdir", "/s").returncode == 0
    held = put(cluster, "/s/f", b"in the snapshot " * 400)["blob"]
    assert cluster.dfs("snapshot", "create", "/s", "snap").returncode == 0
    assert cluster.dfs("rm", "/s/f").returncode == 0  # only the snapshot holds it now
    cluster.stop("node-1")
    delete_blob(cluster, "node-1", kept)
    rewrite_chunk(cluster, "node-1", held)
    cluster.restart("node-1")
    cluster.wait_nodes_up(3)

    status, doc = check(cluster, "--deep")
    assert status == 3, doc
    found = {(f["kind"], f["node"], f["blob"]) for f in doc["findings"]}
    node = cluster.node_id("node-1")
    assert ("missing_replica", node, kept) in found, found
    assert ("checksum_mismatch", node, held) in found, found
    assert doc["held"] >= 2
    labels = {f["blob"]: f["path"] for f in doc["findings"]}
    assert "kept version 1" in labels[kept] and "snapshot" in labels[held], labels

    status, fixed = check(cluster, "--deep", "--repair")
    assert status == 0, fixed["findings"]
    status, after = check(cluster, "--deep")
    assert status == 0 and after["findings"] == [], after["findings"]
    assert cluster.dfs("cat", "/k", "--version", "1").stdout == b"kept version " * 400
    assert cluster.dfs("cat", "/s/.snapshots/snap/f").stdout == b"in the snapshot " * 400

    # The reference count itself: a kept version's index entry lost (as a bug or a torn
    # migration could leave it) is found, and the repair writes it again.
    ino = cluster.dfs_json("stat", "/k")["ino"]
    cluster.stop("coordinator")
    edit_coordinator(cluster, lambda txn, dbs: txn.delete(U64x3.pack(kept, ino, 1),
                                                          db=dbs["retained"]))
    cluster.restart("coordinator")
    cluster.wait_nodes_up(3)
    status, drift = check(cluster)
    assert status == 3
    assert [f["blob"] for f in drift["findings"] if f["kind"] == "reference_count"] == [kept]
    # Counted by nothing, its copies look like orphans: the repair fixes the count first.
    assert {f["blob"] for f in drift["findings"] if f["kind"] == "orphan_blob"} <= {kept}
    status, fixed = check(cluster, "--repair")
    assert status == 0, fixed["findings"]
    assert [f["kind"] for f in fixed["findings"]] == ["reference_count"], fixed["findings"]
    assert check(cluster)[0] == 0
    time.sleep(2)  # the GC grace (1 s): nothing of the kept version was queued
    assert on_nodes(cluster, kept) == 3
    assert cluster.dfs("cat", "/k", "--version", "1").stdout == b"kept version " * 400
