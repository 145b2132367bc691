"""Regression tests for bugs the nemesis campaigns (scripts/nemesis, docs/nemesis.md) found.

Each test is named after the scenario that exposed the bug and says what was wrong.
"""

from __future__ import annotations

import os

from cluster import Cluster

from dfs.chunks import CHUNK_SIZE


def test_bitflip_in_a_node_store_larger_than_lmdb_default_map(cluster: Cluster) -> None:
    """Bit flips in a stopped node's LMDB (the nemesis's `bitflip` fault) failed with
    MDB_MAP_FULL once the node held more than 10 MiB: the store was opened with lmdb's default
    map size, so a store that filled its file had no free page for the copy-on-write put.
    Cluster.corrupt_chunk (and the nemesis) now map past the file's size."""
    data = os.urandom(12 * CHUNK_SIZE + 5)
    assert cluster.dfs("put", "-", "/big", input=data).returncode == 0
    blob = cluster.dfs_json("stat", "/big")["blob"]
    assert (cluster.node_store_path("node-1") / "data.mdb").stat().st_size > 10 * 2**20
    cluster.stop("node-1")
    cluster.corrupt_chunk("node-1", blob, index=11)
    cluster.restart("node-1")
    got = cluster.dfs("cat", "/big")
    assert got.returncode == 0, got.stderr
    assert got.stdout == data  # the bad chunk is detected and read from another replica
