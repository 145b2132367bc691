"""Reads report what they find wrong with a replica, and fail over (issue 8, item 6a): a copy
the node lost (ENOENT) or one that is consistent but wrong (whole-file xxh3_128) is reported
to the coordinator, whose repair worker re-makes it, without any `dfs check --repair`."""

from __future__ import annotations

from checker_helpers import NODE_ARGS, MiB, check, copy_ok, node_blobs, put_files, stat
from replica_damage import delete_blob, rewrite_chunk


def test_a_missing_replica_is_reported_by_a_read_and_repaired(cluster_factory, tmp_path) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 1, big=2 * MiB)
    f = stat(cluster, "/f0")
    first = cluster.node_name(f["replicas"][0])  # the replica a reader tries first
    cluster.stop(first)
    delete_blob(cluster, first, f["blob"])
    cluster.restart(first)
    assert f["blob"] not in node_blobs(cluster, first)

    assert cluster.dfs("cat", "/f0").stdout == files["/f0"]
    cluster.wait_until(lambda: f["blob"] in node_blobs(cluster, first)
                       and copy_ok(cluster, first, f["blob"]), timeout=20,
                       message="the missing copy re-made after the read reported it")
    status, doc = check(cluster, "--deep")
    assert status == 0, doc


def test_a_consistent_but_wrong_replica_is_reported_and_never_delivered(
        cluster_factory, tmp_path) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 1, big=2 * MiB)
    f = stat(cluster, "/f0")
    first = cluster.node_name(f["replicas"][0])
    cluster.stop(first)
    rewrite_chunk(cluster, first, f["blob"], index=1)  # every chunk digest still matches
    cluster.restart(first)

    out = tmp_path / "out"
    result = cluster.dfs("get", "/f0", out)
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == files["/f0"]
    cluster.wait_until(lambda: copy_ok(cluster, first, f["blob"]), timeout=20,
                       message="the wrong copy re-made after the read reported it")
    status, doc = check(cluster, "--deep")
    assert status == 0, doc
