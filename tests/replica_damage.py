"""Damage a stopped node's copy of a blob in its LMDB (docs/design.md §3 layout): delete it, or
rewrite a chunk together with its stored digest (a copy that is consistent but wrong: every
chunk passes its digest, only the whole-file xxh3_128 tells)."""

from __future__ import annotations

import struct

import lmdb
from cluster import Cluster

from dfs.chunks import CHUNK_SIZE, chunk_digest


def _env(cluster: Cluster, name: str) -> lmdb.Environment:
    assert not cluster.running(name), "stop the node before editing its store"
    path = cluster.node_store_path(name)
    map_size = 2 * (path / "data.mdb").stat().st_size + 2**26
    return lmdb.open(str(path), max_dbs=8, subdir=True, map_size=map_size)


def delete_blob(cluster: Cluster, name: str, blob: int) -> None:
    """The node loses its copy: record and chunks gone."""
    env = _env(cluster, name)
    try:
        blobs, chunks = env.open_db(b"blobs"), env.open_db(b"chunks")
        prefix = struct.pack(">Q", blob)
        with env.begin(write=True) as txn:
            assert txn.delete(prefix, db=blobs)
            cursor = txn.cursor(db=chunks)
            if cursor.set_range(prefix):
                while cursor.key()[:8] == prefix and cursor.delete():
                    pass
    finally:
        env.close()


def rewrite_chunk(cluster: Cluster, name: str, blob: int, index: int = 0) -> None:
    """Flip every byte of one chunk and store the digest of the new bytes with it."""
    env = _env(cluster, name)
    try:
        chunks = env.open_db(b"chunks")
        key = struct.pack(">QI", blob, index)
        with env.begin(write=True, db=chunks) as txn:
            data = bytes(b ^ 0x5A for b in txn.get(key)[8:])
            assert len(data) <= CHUNK_SIZE
            txn.put(key, chunk_digest(data) + data)
    finally:
        env.close()
