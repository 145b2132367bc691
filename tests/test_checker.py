"""`dfs check [--deep] [--repair]` on real clusters, with real damage made in the nodes' and the
coordinator's LMDB (docs/design.md §3 layout) or over the wire: every kind of finding is named,
repaired through a transaction, and a second check is clean (docs/checker.md)."""

from __future__ import annotations

import struct

from checker_helpers import (
    COORDINATOR_ARGS,
    NODE_ARGS,
    MiB,
    check,
    copy_ok,
    edit_coordinator,
    kinds,
    node_blobs,
    node_call,
    put_files,
    stat,
    unlink_raw,
)

from dfs.chunks import CHUNK_SIZE, file_checksum

UNKNOWN_TXID = 10**9  # never allocated: the coordinator has no record of it, ever


def test_flipped_bytes_found_by_deep_check_and_repaired(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 6, big=2 * MiB)
    a = stat(cluster, "/f0")
    victim = cluster.node_name(a["replicas"][0])  # the copy a reader tries first
    cluster.stop(victim)
    cluster.corrupt_chunk(victim, a["blob"], index=1, offset=77)
    cluster.restart(victim)

    status, doc = check(cluster)  # stored checksums agree: only --deep can see rot
    assert status == 0 and doc["clean"], doc
    status, doc = check(cluster, "--deep")
    assert status == 3
    [finding] = doc["findings"]
    assert (finding["kind"], finding["path"], finding["node"]) == (
        "corrupt_chunk", "/f0", a["replicas"][0])
    assert finding["chunks"] == [1] and finding["blob"] == a["blob"]
    text = cluster.dfs("check", "--deep")
    assert text.returncode == 3 and b"/f0" in text.stdout and b"corrupt chunk" in text.stdout

    got = cluster.dfs("cat", "/f0")  # fails over to a good copy, never returns bad bytes
    assert got.returncode == 0 and got.stdout == files["/f0"]

    status, doc = check(cluster, "--deep", "--repair")
    assert status == 0, doc["findings"]
    assert all(f["fixed"] for f in doc["findings"])
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc
    assert copy_ok(cluster, victim, a["blob"])
    assert stat(cluster, "/f0")["version"] == a["version"], "a repair keeps the version"
    assert cluster.dfs("cat", "/f0").stdout == files["/f0"]


def test_missing_replica_orphan_leftovers_and_namespace_damage_are_found_and_repaired(
    cluster_factory,
) -> None:
    # --outcome-after 600: the PREPARED leftover is not asked about on a timer; the coordinator's
    # restart below (a new incarnation) makes the node clean both leftovers itself.
    node_args = (*NODE_ARGS[:-4], "--outcome-after", "600", "--scrub-rate", "0")
    cluster = cluster_factory(node_args=node_args)
    files = put_files(cluster, 5, big=MiB)
    m, x, y = stat(cluster, "/f0"), stat(cluster, "/f1"), stat(cluster, "/f2")
    node1, node2, node3 = "node-1", "node-2", "node-3"
    id1, id2, id3 = (cluster.node_id(n) for n in (node1, node2, node3))

    # A replica deleted; an orphan committed behind the coordinator's back; leftovers.
    assert node_call(cluster, node2, "delete", blobs=[m["blob"]])["deleted"] == 1
    orphan, prepared, staged = UNKNOWN_TXID, UNKNOWN_TXID + 1, UNKNOWN_TXID + 2
    data = b"nobody's bytes"
    node_call(cluster, node1, "stage", txid=orphan, index=0, data=data)
    node_call(cluster, node1, "prepare", txid=orphan, size=len(data),
              checksum=file_checksum(data), nchunks=1)
    node_call(cluster, node1, "commit", txid=orphan)
    node_call(cluster, node3, "stage", txid=prepared, index=0, data=data)
    node_call(cluster, node3, "prepare", txid=prepared, size=len(data),
              checksum=file_checksum(data), nchunks=1)
    node_call(cluster, node3, "stage", txid=staged, index=0, data=data)

    # The namespace: /f1's inode record gone (its entry dangles), /f2's entry gone.
    cluster.stop("coordinator")

    def damage(txn, dbs) -> None:
        assert txn.delete(struct.pack(">Q", x["ino"]), db=dbs["inodes"])
        assert unlink_raw(txn, dbs, 1, b"f2") == y["ino"]

    edit_coordinator(cluster, damage)
    cluster.restart("coordinator")

    status, doc = check(cluster)
    assert status == 3
    found = kinds(doc)
    assert ("missing_replica", "/f0", id2) in found
    assert ("orphan_blob", None, id1) in found
    # Leftovers of txids the restarted coordinator does not know: the node drops them itself
    # (presumed abort); while it does they are cleanup in progress, never findings.
    assert not {k for k, _, _ in found} & {"stale_prepared", "stale_staged"}
    assert {c["blob"] for c in doc["cleanup_in_progress"]} <= {prepared, staged}
    assert ("dangling_entry", "/f1", None) in found
    assert ("unlinked_inode", None, None) in found
    blobs = {(f["kind"], f["node"], f["blob"]) for f in doc["findings"]}
    assert ("orphan_blob", id1, orphan) in blobs
    assert {("orphan_blob", n, x["blob"]) for n in x["replicas"]} <= blobs, \
        "the blobs of a file whose inode vanished are orphans"
    assert [f["ino"] for f in doc["findings"] if f["kind"] == "unlinked_inode"] == [y["ino"]]

    status, doc = check(cluster, "--repair")
    assert status == 0, doc
    status, doc = check(cluster)
    assert status == 0 and doc["clean"], doc

    assert cluster.dfs("cat", "/f0").stdout == files["/f0"]
    assert node_blobs(cluster, node2).get(m["blob"]) == "COMMITTED"
    lost = cluster.dfs("cat", f"/lost+found/#{y['ino']}")
    assert lost.returncode == 0 and lost.stdout == files["/f2"]
    assert cluster.dfs("stat", "/f1").returncode == 1
    cluster.wait_until(
        lambda: orphan not in node_blobs(cluster, node1)
        and not {prepared, staged} & set(node_blobs(cluster, node3)),
        timeout=15, message="orphan and leftovers deleted")


def test_read_repair_and_scrub_fix_rot_without_a_check(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 3, big=2 * MiB)
    r, s = stat(cluster, "/f0"), stat(cluster, "/f1")

    # A reader meets the rotten copy: it gets good bytes, and the coordinator repairs.
    reader_first = cluster.node_name(r["replicas"][0])
    cluster.stop(reader_first)
    cluster.corrupt_chunk(reader_first, r["blob"], index=2)
    cluster.restart(reader_first)
    assert not copy_ok(cluster, reader_first, r["blob"])
    assert cluster.dfs("cat", "/f0").stdout == files["/f0"]
    cluster.wait_until(lambda: copy_ok(cluster, reader_first, r["blob"]), timeout=20,
                       message="read repair of the reported copy")
    assert cluster.status()["repairs"]["fixed"] >= 1

    # Nobody reads /f1; the node's own scrub finds the rot.
    scrubbed = cluster.node_name(s["replicas"][-1])
    cluster.stop(scrubbed)
    cluster.corrupt_chunk(scrubbed, s["blob"])
    plain = cluster.node_args
    cluster.node_args = [*NODE_ARGS[:-2], "--scrub-rate", "50", "--scrub-interval", "0.5"]
    try:
        cluster.restart(scrubbed)
    finally:
        cluster.node_args = plain
    cluster.wait_until(lambda: copy_ok(cluster, scrubbed, s["blob"]), timeout=20,
                       message="scrub report and repair")
    status, doc = check(cluster, "--deep")
    assert status == 0, doc


def test_a_file_with_no_good_replica_is_lost_and_left_untouched(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    put_files(cluster, 2, big=CHUNK_SIZE)
    a = stat(cluster, "/f0")
    for n in a["replicas"]:
        name = cluster.node_name(n)
        cluster.stop(name)
        cluster.corrupt_chunk(name, a["blob"], index=0, offset=n)
        cluster.restart(name, wait=False)
    cluster.wait_nodes_up()
    status, doc = check(cluster, "--deep", "--repair")
    assert status == 3
    lost = [f for f in doc["findings"] if f["kind"] == "lost_file"]
    assert [(f["path"], f["fixed"]) for f in lost] == [("/f0", False)]
    assert all(not f["fixed"] for f in doc["findings"] if f["path"] == "/f0")
    after = stat(cluster, "/f0")
    assert (after["replicas"], after["version"]) == (a["replicas"], a["version"])
    for n in a["replicas"]:  # the bad copies are still there, for an operator to look at
        assert node_blobs(cluster, cluster.node_name(n)).get(a["blob"]) == "COMMITTED"
    assert cluster.dfs("cat", "/f0").returncode == 1
    status, doc = check(cluster, "/f1", "--deep")
    assert status == 0, "a PATH limits the check to that subtree"
