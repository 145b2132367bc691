"""Issue 12: Prometheus metrics of every process (`--metrics HOST:PORT`) and `dfs stats`
(docs/operations.md, "Metrics").

Real processes on loopback: a coordinator and a node serve their registries on OS-picked
ports, found in the "dfs ... metrics on HOST:PORT" line; scrapes go through httpx and are
parsed by prometheus_client's own parser, so what is checked is what Prometheus would read.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from cluster import COORDINATOR, Cluster
from mount_harness import mounted, require_fuse
from prometheus_client.parser import text_string_to_metric_families

from dfs.cli.main import main
from dfs.cli.procs import DFS
from dfs.metrics.rates import bucket_delta, cluster_rates, quantile

METRICS = ["--metrics", "127.0.0.1:0"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def mcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster whose coordinator and node-1 serve metrics."""
    cluster = Cluster(tmp_path_factory.mktemp("metrics-cluster"),
                      extra_args={COORDINATOR: METRICS, "node-1": METRICS})
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


def metrics_address(cluster: Cluster, name: str) -> str:
    text = (cluster.root / f"{name}.log").read_text()
    found = re.findall(r"^dfs \w+ metrics on (\S+)$", text, re.MULTILINE)
    assert found, f"no metrics line in {name}'s log:\n{cluster.log(name)}"
    return found[-1]


def scrape(address: str) -> Samples:
    reply = httpx.get(f"http://{address}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def put(cluster: Cluster, path: str, data: bytes, *extra: str) -> subprocess.CompletedProcess:
    return cluster.dfs("put", "-", path, *extra, input=data)


def put_many(cluster: Cluster, prefix: str, n: int, size: int) -> None:
    """n new files of `size` bytes, one commit each, through the client library (quicker
    than n `dfs put` processes)."""

    async def run() -> None:
        async with cluster.client() as client:
            root = await client.resolve("/")
            for i in range(n):
                attr = await client.create(root.ino, f"{prefix}{i}".encode(), 0o100644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(os.urandom(size)))

    trio.run(run)


def test_commits_latency_rpc_and_space_are_scraped(mcluster: Cluster) -> None:
    coord, node = metrics_address(mcluster, COORDINATOR), metrics_address(mcluster, "node-1")
    before = scrape(coord)
    n = 6
    put_many(mcluster, "mf", n, 4096)
    after = scrape(coord)
    assert value(after, "dfs_commits_total") - value(before, "dfs_commits_total") == n
    assert value(after, "dfs_committed_bytes_total") - \
        value(before, "dfs_committed_bytes_total") == n * 4096
    count = "dfs_commit_duration_seconds_count"
    assert value(after, count) - value(before, count) == n
    assert value(after, "dfs_commit_duration_seconds_bucket", le="+Inf") == value(after, count)
    assert value(after, "dfs_commit_duration_seconds_sum") > 0
    # Server-side RPCs per op, with their latency (the commit op answered each put).
    for op in ("begin", "commit", "heartbeat"):
        assert value(after, "dfs_rpc_requests_total", op=op) > 0, op
        assert value(after, "dfs_rpc_request_duration_seconds_count", op=op) == \
            value(after, "dfs_rpc_requests_total", op=op)
    assert value(after, "dfs_rpc_requests_total", op="commit") - \
        value(before, "dfs_rpc_requests_total", op="commit") == n
    # State gauges, computed at scrape time.
    assert value(after, "dfs_coordinator_leader") == 1
    assert ("dfs_2pc_transactions", frozenset({("phase", "preparing")})) in after
    for gauge in ("dfs_gc_queue_depth", "dfs_repair_queue_depth",
                  "dfs_rereplication_queue_depth"):
        assert (gauge, frozenset()) in after, gauge
    assert value(after, "dfs_cluster_nodes", state="up") == 3
    # The node: its own RPCs (every put staged a chunk on it: R=3 of 3 nodes), its space.
    on_node = scrape(node)
    assert value(on_node, "dfs_rpc_requests_total", op="stage") >= n
    assert value(on_node, "dfs_rpc_request_bytes_total", op="stage") >= n * 4096
    assert value(on_node, "dfs_node_capacity_bytes") > 0
    assert value(on_node, "dfs_node_used_bytes") > 0
    assert ("dfs_scrub_bytes_total", frozenset()) in on_node
    # The bound addresses are in the status output too.
    assert mcluster.status()["metrics"] == coord
    assert httpx.get(f"http://{coord}/nope", timeout=10).status_code == 404


def test_an_aborted_commit_counts_under_its_reason(mcluster: Cluster) -> None:
    coord = metrics_address(mcluster, COORDINATOR)
    assert put(mcluster, "/mcas", b"v1", "--if-version", "0").returncode == 0
    before = scrape(coord)
    stale = put(mcluster, "/mcas", b"stale", "--if-version", "0")
    assert stale.returncode == 1 and b"CONFLICT" in stale.stderr
    after = scrape(coord)
    assert value(after, "dfs_aborts_total", reason="conflict") - \
        value(before, "dfs_aborts_total", reason="conflict") == 1
    assert value(after, "dfs_commits_total") == value(before, "dfs_commits_total")
    assert mcluster.dfs_json("stats")["aborts"]["conflict"] >= 1


def test_stats_json_after_puts(mcluster: Cluster) -> None:
    first = mcluster.dfs_json("stats")
    n, size = 5, 64 * 1024
    put_many(mcluster, "ms", n, size)

    def reported() -> dict | None:  # the nodes' counters come with their next heartbeat
        doc = mcluster.dfs_json("stats")
        staged = sum(node["bytes_in"] for node in doc["nodes"])
        old = sum(node["bytes_in"] for node in first["nodes"])
        return doc if staged - old >= 3 * n * size else None

    doc = mcluster.wait_until(reported, 10, message="nodes' stats in heartbeats")
    assert doc["commits"] - first["commits"] == n
    assert doc["committed_bytes"] - first["committed_bytes"] == n * size
    latency = doc["commit_latency"]
    assert latency["count"] == doc["commits"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] < 30_000
    assert [node["state"] for node in doc["nodes"]] == ["up"] * 3
    assert all(node["capacity"] > 0 and node["requests"] > 0 for node in doc["nodes"])
    assert set(doc["phases"]) == {"staging", "preparing", "deciding", "committing", "ending"}
    rates = cluster_rates(doc, first)
    assert rates["commits_per_s"] > 0 and rates["in_bytes_per_s"] > 0


def test_the_live_view_refreshes_and_ends_cleanly_on_ctrl_c(mcluster: Cluster) -> None:
    shown = mcluster.dfs("stats", "--interval", "0.2", "--count", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(b"commits/s") == 2 and b"127.0.0.1:" in shown.stdout
    proc = subprocess.Popen([*DFS, "stats", "--interval", "0.2"], env=mcluster.cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert b"dfs stats" in first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == b""


def test_bad_metrics_address_is_one_line_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run([*DFS, "coordinator", "--data", str(tmp_path / "c"),
                             "--metrics", "nope"], capture_output=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "dfs coordinator: argument --metrics: bad address 'nope': want HOST:PORT "
        "(see 'dfs coordinator --help')"]
    for command in (["coordinator", "--data", str(tmp_path / "c")],
                    ["node", "--data", str(tmp_path / "n")],
                    ["mount", str(tmp_path)]):
        for bad in ("127.0.0.1:99999", "127.0.0.1", ":80"):
            with pytest.raises(SystemExit) as exit:  # the same parser, in this process
                main([*command, "--metrics", bad])
            assert exit.value.code == 2, (command, bad)
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and "--metrics" in lines[0], lines


def test_a_metrics_port_taken_is_one_line_exit_1(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        secret = tmp_path / "secret"
        secret.write_text(os.urandom(32).hex())
        result = subprocess.run(
            [*DFS, "--secret-file", str(secret), "coordinator", "--data", str(tmp_path / "c"),
             "--listen", "127.0.0.1:0", "--metrics", address],
            capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    finally:
        taken.close()
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [f"dfs coordinator: cannot serve metrics on {address}: "
                     "Address already in use"], lines


@pytest.mark.mount
def test_a_mount_read_counts_in_its_op_latency(cluster_factory, tmp_path: Path) -> None:
    require_fuse()
    cluster = cluster_factory(nodes=3, replicas=3)
    with mounted(cluster, tmp_path / "mnt", args=METRICS) as mount:
        text = mount.child.log.read_text()  # type: ignore[union-attr]
        address = re.findall(r"^dfs mount metrics on (\S+)$", text, re.MULTILINE)[-1]
        (mount / "f").write_bytes(b"hello" * 1000)
        before = scrape(address)
        for _ in range(2):
            with open(mount / "f", "rb") as f:  # direct_io: every read reaches the mount
                assert f.read() == b"hello" * 1000
        after = scrape(address)
    reads = "dfs_mount_op_duration_seconds_count"
    assert value(after, reads, op="read") - value(before, reads, op="read") >= 2
    assert value(after, reads, op="open") - value(before, reads, op="open") >= 2
    assert value(after, "dfs_mount_op_duration_seconds_sum", op="read") > 0
    hits, misses = (value(after, f"dfs_mount_cache_{k}_total") for k in ("hits", "misses"))
    assert hits >= 1 and hits + misses >= 2  # the second open reads what the first cached
    assert 0 < value(after, "dfs_mount_cache_hit_ratio") <= 1


# ---------------------------------------------------------------- without a cluster


def test_percentiles_from_buckets() -> None:
    buckets = [[0.001, 0], [0.01, 50], [0.1, 99], [1.0, 100], ["+Inf", 100]]
    assert quantile(buckets, 0.5) == pytest.approx(0.01)
    assert quantile(buckets, 0.25) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(buckets, 0.99) == pytest.approx(0.1)
    assert quantile([[1.0, 0], ["+Inf", 0]], 0.5) is None
    assert quantile([[1.0, 0], ["+Inf", 4]], 0.5) == 1.0  # past the last bound: that bound
    newer = [[0.001, 1], [0.01, 60], [0.1, 120], [1.0, 121], ["+Inf", 121]]
    assert bucket_delta(newer, buckets) == [[0.001, 1], [0.01, 10], [0.1, 21], [1.0, 21],
                                            ["+Inf", 21]]

