"""Helpers for checker and node-lifecycle tests on real clusters (tests/cluster.py)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import lmdb
import trio
from cluster import Cluster

from dfs.rpc import Peer

MiB = 1024 * 1024
# Scrub off: a test that corrupts a replica decides itself who finds it.
NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "1", "--scrub-rate", "0")
COORDINATOR_ARGS = ("--node-timeout", "1.5", "--gc-grace", "1", "--vote-timeout", "2",
                    "--txn-timeout", "10")


def node_call(cluster: Cluster, name: str, op: str, **fields: Any) -> dict[str, Any]:
    """One request to a running node, over the wire."""

    async def go() -> dict[str, Any]:
        peer = Peer(cluster.procs[name].address, cluster.secret)
        try:
            return await peer.call(op, retry_for=5, **fields)
        finally:
            await peer.aclose()

    return trio.run(go)


def node_blobs(cluster: Cluster, name: str) -> dict[int, str]:
    reply = node_call(cluster, name, "list", after=0, limit=10_000)
    return {int(b[0]): b[1] for b in reply["blobs"]}


def copy_ok(cluster: Cluster, name: str, blob: int) -> bool:
    """Whether the node's copy of blob re-hashes right (deep verification on the node)."""
    verdict = node_call(cluster, name, "verify", blobs=[blob])["results"][blob]
    return bool(verdict["ok"])


def check(cluster: Cluster, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """`dfs check ... --json`: (exit status, the document)."""
    result = cluster.dfs("check", *args, "--json", timeout=timeout)
    assert result.returncode in (0, 3), result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


def kinds(doc: dict[str, Any]) -> set[tuple[str, Any, Any]]:
    return {(f["kind"], f["path"], f["node"]) for f in doc["findings"]}


def put_files(cluster: Cluster, count: int, prefix: str = "/f", big: int = 0
              ) -> dict[str, bytes]:
    """count files written through the client library (one process, fast)."""
    files = {f"{prefix}{i}": os.urandom(100 + 37 * i + (big if i == 0 else 0))
             for i in range(count)}

    async def go() -> None:
        import io

        async with cluster.client() as client:
            root = await client.resolve("/")
            for path, data in files.items():
                attr = await client.create(root.ino, path[1:].encode(), 0o100644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(data))

    trio.run(go)
    return files


def stat(cluster: Cluster, path: str) -> dict[str, Any]:
    return cluster.dfs_json("stat", path)


def all_stats(cluster: Cluster, paths: list[str]) -> dict[str, dict[str, Any]]:
    async def go() -> dict[str, dict[str, Any]]:
        async with cluster.client() as client:
            return {p: (await client.resolve(p)).to_json() for p in paths}

    return trio.run(go)


def edit_coordinator(cluster: Cluster, fn: Any) -> None:
    """Run fn(txn, dbs) on the stopped coordinator's LMDB (docs/coordinator.md layout)."""
    path = cluster.data_dir("coordinator")
    # A map well past the file: copy-on-write edits need free pages (lmdb's default is 10 MiB).
    env = lmdb.open(str(path), max_dbs=32, subdir=True,
                    map_size=2 * (path / "data.mdb").stat().st_size + 2**26)
    try:
        dbs = {n: env.open_db(n.encode()) for n in ("inodes", "dentries", "dircookies",
                                                     "versions", "retained")}
        with env.begin(write=True) as txn:
            fn(txn, dbs)
    finally:
        env.close()


def unlink_raw(txn: lmdb.Transaction, dbs: dict[str, Any], parent: int, name: bytes) -> int:
    """Delete a directory entry (and its cookie) but not its inode: the inode is unnamed."""
    raw = txn.get(struct.pack(">Q", parent) + name, db=dbs["dentries"])
    ino, cookie = struct.unpack(">QQ", raw)
    txn.delete(struct.pack(">Q", parent) + name, db=dbs["dentries"])
    txn.delete(struct.pack(">QQ", parent, cookie), db=dbs["dircookies"])
    return ino


def read_all(cluster: Cluster, paths: list[str]) -> dict[str, bytes]:
    """Every file's content, read (and verified) through one library client."""

    async def go() -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        async with cluster.client() as client:
            for path in paths:
                chunks: list[bytes] = []
                await client.read_file(await client.resolve(path), chunks.append)
                out[path] = b"".join(chunks)
        return out

    return trio.run(go)
