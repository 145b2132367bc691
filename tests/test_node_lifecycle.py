"""The life of a node on real clusters: lost for good and removed, down too long and
re-replicated automatically (its stale blobs collected when it returns), drained under
concurrent writes (docs/checker.md)."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import trio
from checker_helpers import COORDINATOR_ARGS, NODE_ARGS, all_stats, check, node_blobs, put_files
from cluster import Cluster

from dfs.errors import DfsError


def assert_fully_replicated(cluster: Cluster, files: dict[str, bytes], gone: int) -> None:
    stats = all_stats(cluster, list(files))
    for path, st in stats.items():
        assert len(set(st["replicas"])) == 3, (path, st["replicas"])
        assert gone not in st["replicas"], (path, st["replicas"])
    status, doc = check(cluster, "--deep")
    assert status == 0, doc


def test_node_killed_for_good_is_reported_then_removed_and_rereplicated(
    cluster_factory,
) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS)
    files = put_files(cluster, 24, big=3 * 1024 * 1024)
    dead = cluster.node_id("node-4")
    on_dead = [p for p, st in all_stats(cluster, list(files)).items() if dead in st["replicas"]]
    assert on_dead, "placement put nothing on node-4"
    cluster.kill("node-4")
    cluster.wait_until(lambda: cluster.status()["nodes"][dead - 1]["state"] == "down",
                       timeout=10, message="node-4 down")

    status, doc = check(cluster)
    assert status == 3
    under = {(f["path"], f["node"]) for f in doc["findings"] if f["kind"] == "under_replicated"}
    assert under == {(p, dead) for p in on_dead}
    assert {f["kind"] for f in doc["findings"]} == {"under_replicated"}

    removed = cluster.dfs("node", "remove", str(dead), "--json", timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert_fully_replicated(cluster, files, dead)
    for path, data in list(files.items())[:3]:
        assert cluster.dfs("cat", path).stdout == data
    rr = cluster.status()["rereplication"]
    assert rr["done"] >= len(on_dead) and rr["failed"] == 0


def test_node_down_too_long_is_rereplicated_and_collected_when_back(cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS,
                              coordinator_args=(*COORDINATOR_ARGS, "--rereplicate-after", "2"))
    files = put_files(cluster, 16)
    gone = cluster.node_id("node-2")
    moved = {st["blob"] for st in all_stats(cluster, list(files)).values()
             if gone in st["replicas"]}
    assert moved
    cluster.kill("node-2")

    def rereplicated() -> bool:
        return all(gone not in st["replicas"]
                   for st in all_stats(cluster, list(files)).values())

    cluster.wait_until(rereplicated, timeout=30, interval=0.3, message="re-replication")
    line = cluster.dfs("status").stdout.decode()
    assert "re-replication" in line and "node 2 (down)" in line, line
    assert_fully_replicated(cluster, files, gone)

    cluster.restart("node-2")  # back, with copies nobody lists any more
    cluster.wait_until(lambda: not moved & set(node_blobs(cluster, "node-2")), timeout=30,
                       interval=0.3, message="stale blobs collected on the returning node")


def test_drain_under_concurrent_writes_loses_nothing(cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS)
    files = put_files(cluster, 30, big=2 * 1024 * 1024)
    drained = cluster.node_id("node-1")
    stop = threading.Event()
    outcomes: list[tuple[str, str, float]] = []

    def writer() -> None:
        async def go() -> None:
            async with cluster.client() as client:
                root = await client.resolve("/")
                i = 0
                while not stop.is_set():
                    name = f"w{i % 8}".encode()
                    try:
                        attr = await client.create(root.ino, name, 0o100644, 0, 0,
                                                   exclusive=False)
                        await client.write_file(attr.ino, io.BytesIO(os.urandom(3000 + i)))
                    except DfsError as e:
                        outcomes.append(("failed", str(e), time.monotonic()))
                    else:
                        outcomes.append(("ok", name.decode(), time.monotonic()))
                    i += 1
                    await trio.sleep(0.01)

        trio.run(go)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        cluster.wait_until(lambda: len(outcomes) >= 3, message="writes under way")
        began = time.monotonic()
        result = cluster.dfs("node", "drain", str(drained), "--json", timeout=90)
        ended = time.monotonic()
    finally:
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    failed = [o for o in outcomes if o[0] == "failed"]
    assert not failed, failed
    assert sum(began < t < ended for _, _, t in outcomes) >= 5, "writes ran during the drain"
    assert json.loads(result.stdout)["moved"] > 0
    written = {f"/w{i}" for i in range(8) if any(o[:2] == ("ok", f"w{i}") for o in outcomes)}
    stats = all_stats(cluster, [*files, *written])
    assert all(drained not in st["replicas"] and len(set(st["replicas"])) == 3
               for st in stats.values()), stats
    status, doc = check(cluster, "--deep")
    assert status == 0, doc
    for path in list(files)[:3]:
        assert cluster.dfs("cat", path).stdout == files[path]
    node = [n for n in cluster.status()["nodes"] if n["id"] == drained][0]
    assert node["state"] == "draining"
    assert cluster.dfs("node", "remove", str(drained), timeout=30).returncode == 0

    # With two of four nodes out, R=3 has nowhere to go: a clear error, nothing lost.
    second = cluster.node_id("node-2")
    stuck = cluster.dfs("node", "drain", str(second), timeout=60)
    assert stuck.returncode == 1
    assert stuck.stderr.count(b"\n") == 1 and b"cannot be moved" in stuck.stderr, stuck.stderr
    assert cluster.dfs("cat", list(files)[0]).stdout == files[list(files)[0]]
