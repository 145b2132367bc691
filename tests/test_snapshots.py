"""Snapshots on a real cluster (docs/coordinator.md, "Snapshots"): a point-in-time, read-only
copy of a subtree, read at PATH/.snapshots/NAME, holding its blobs until it is deleted."""

from __future__ import annotations

import io
import json

import trio
from checker_helpers import check, node_blobs
from cluster import COORDINATOR_ARGS, Cluster

PIECES = (*COORDINATOR_ARGS, "--snapshot-piece", "16")  # many pieces even for a few files


def put(cluster: Cluster, path: str, data: bytes) -> int:
    done = cluster.dfs("put", "-", path, "--json", input=data)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["blob"]


def put_files(cluster: Cluster, count: int, prefix: str) -> dict[str, bytes]:
    """count files PREFIXi through one library client (fast), in an existing directory."""
    files = {f"{prefix}{i}": f"file {i}".encode() * (i + 1) for i in range(count)}

    async def go() -> None:
        async with cluster.client() as client:
            directory = await client.resolve(prefix.rsplit("/", 1)[0] or "/")
            for path, data in files.items():
                name = path.rsplit("/", 1)[1].encode()
                attr = await client.create(directory.ino, name, 0o100644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(data))

    trio.run(go)
    return files


def on_nodes(cluster: Cluster, blob: int) -> int:
    return sum(blob in node_blobs(cluster, f"node-{i}") for i in (1, 2, 3))


def names(cluster: Cluster, path: str) -> set[str]:
    listing = cluster.dfs("ls", path, "--json")
    assert listing.returncode == 0, listing.stderr
    return {e["name"] for e in json.loads(listing.stdout)["entries"]}


def test_a_snapshot_keeps_the_subtree_as_it_was_read_only(cluster_factory) -> None:
    cluster = cluster_factory(coordinator_args=PIECES)
    assert cluster.dfs("mkdir", "-p", "/d/sub").returncode == 0
    old_a = put(cluster, "/d/a", b"a before")
    old_b = put(cluster, "/d/sub/b", b"b before")
    many = put_files(cluster, 20, "/d/sub/many")
    made = cluster.dfs("snapshot", "create", "/d", "monday", "--json")
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert doc["inodes"] == 24 and doc["pieces"] > 3, doc  # 2 dirs + 22 files, in pieces

    new_a = put(cluster, "/d/a", b"a after")
    assert cluster.dfs("rm", "/d/sub/b").returncode == 0
    put(cluster, "/d/c", b"new")

    assert ".snapshots" not in names(cluster, "/d")  # reachable by name, never listed
    assert names(cluster, "/d/.snapshots") == {"monday"}
    assert names(cluster, "/d/.snapshots/monday") == {"a", "sub"}
    assert cluster.dfs("cat", "/d/.snapshots/monday/a").stdout == b"a before"
    assert cluster.dfs("cat", "/d/.snapshots/monday/sub/b").stdout == b"b before"
    assert cluster.dfs("cat", "/d/a").stdout == b"a after"
    gone = cluster.dfs("cat", "/d/.snapshots/monday/c")
    assert gone.returncode == 1 and b"no such file" in gone.stderr
    st = cluster.dfs_json("stat", "/d/.snapshots/monday/a")
    assert st["mode"] & 0o222 == 0 and st["size"] == len(b"a before")

    for args in (("put", "-", "/d/.snapshots/monday/a"), ("rm", "/d/.snapshots/monday/a"),
                 ("mkdir", "/d/.snapshots/monday/x"), ("put", "-", "/d/.snapshots/monday/new"),
                 ("mv", "/d/.snapshots/monday/a", "/d/a2")):
        refused = cluster.dfs(*args, input=b"x")
        assert refused.returncode == 1 and b"read-only" in refused.stderr, (args, refused.stderr)
        assert refused.stderr.count(b"\n") == 1
    assert cluster.dfs("cat", "/d/.snapshots/monday/a").stdout == b"a before"
    taken = cluster.dfs("mkdir", "/d/.snapshots")
    assert taken.returncode == 1 and b"reserved" in taken.stderr, taken.stderr
    again = cluster.dfs("snapshot", "create", "/d", "monday")
    assert again.returncode == 1 and b"monday" in again.stderr

    # The snapshot holds the blobs the live files let go: the GC keeps them, the checker
    # finds nothing wrong.
    cluster.wait_until(lambda: cluster.status()["gc_pending"] == 0, timeout=15,
                       message="GC settled")
    assert on_nodes(cluster, old_a) == 3 and on_nodes(cluster, old_b) == 3
    status, found = check(cluster, "--deep")
    assert status == 0 and found["findings"] == [], found["findings"]

    listed = cluster.dfs_json("snapshot", "list")["snapshots"]
    assert [(s["path"], s["name"]) for s in listed] == [("/d", "monday")]

    # Restore: the live subtree is the snapshot's again, in one transaction, no data copied.
    restored = cluster.dfs_json("snapshot", "restore", "/d", "monday")
    assert (restored["rewritten"], restored["recreated"]) == (1, 1), restored
    assert names(cluster, "/d") == {"a", "sub"}
    assert cluster.dfs("cat", "/d/a").stdout == b"a before"
    assert cluster.dfs("cat", "/d/sub/b").stdout == b"b before"
    assert cluster.dfs_json("stat", "/d/a")["blob"] == old_a

    # Deleted, the snapshot lets go of its blobs: what is current again stays, the rest goes.
    assert cluster.dfs("snapshot", "delete", "/d", "monday").returncode == 0
    assert cluster.dfs_json("snapshot", "list")["snapshots"] == []
    cluster.wait_until(lambda: on_nodes(cluster, new_a) == 0, timeout=15,
                       message="the blob the restore replaced collected")
    assert on_nodes(cluster, old_a) == 3 and on_nodes(cluster, old_b) == 3
    assert cluster.dfs("cat", "/d/sub/many3").stdout == many["/d/sub/many3"]
    status, found = check(cluster, "--deep")
    assert status == 0 and found["findings"] == [], found["findings"]


def test_a_multi_file_commit_is_wholly_in_a_snapshot_or_wholly_out(cluster_factory) -> None:
    cluster = cluster_factory(coordinator_args=PIECES)
    assert cluster.dfs("mkdir", "/g").returncode == 0
    files = [f"/g/f{i}" for i in range(3)]

    async def run() -> int:
        rounds = 0
        async with cluster.client() as client, trio.open_nursery() as nursery:
            stop = trio.Event()

            async def writer() -> None:
                nonlocal rounds
                while not stop.is_set():
                    rounds += 1
                    async with client.transaction() as t:
                        for path in files:
                            t.write(path, f"round {rounds}".encode())

            nursery.start_soon(writer)
            for n in range(6):
                await trio.sleep(0.15)
                await client.snapshot_create("/g", f"s{n}".encode())
            stop.set()
        return rounds

    assert trio.run(run) >= 3
    seen = set()
    for n in range(6):
        contents = {cluster.dfs("cat", f"/g/.snapshots/s{n}/f{i}").stdout for i in range(3)}
        assert len(contents) <= 1, f"snapshot s{n} holds a half-applied commit: {contents}"
        seen |= contents
    assert len(seen) >= 2, "the snapshots did not catch the writer at different points"


def test_a_crash_while_a_snapshot_is_written_leaves_none_behind(cluster_factory) -> None:
    cluster = cluster_factory(coordinator_args=PIECES)
    assert cluster.dfs("mkdir", "/d").returncode == 0
    files = put_files(cluster, 10, "/d/f")
    cluster.restart("coordinator", env={"DFS_FAILPOINTS": "snapshot.after_piece=crash"})
    crashed = cluster.dfs("snapshot", "create", "/d", "half", timeout=30)
    assert crashed.returncode == 1
    cluster.wait_until(lambda: not cluster.running("coordinator"), timeout=10,
                       message="the coordinator crashed at the failpoint")
    cluster.restart("coordinator", env={})
    cluster.wait_until(lambda: cluster.dfs_json("snapshot", "list")["snapshots"] == [],
                       timeout=10, message="the half-written snapshot dropped")
    missing = cluster.dfs("ls", "/d/.snapshots/half")
    assert missing.returncode == 1
    assert cluster.dfs("snapshot", "create", "/d", "half").returncode == 0
    assert cluster.dfs("cat", "/d/.snapshots/half/f7").stdout == files["/d/f7"]
