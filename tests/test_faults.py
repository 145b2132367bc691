"""Crash every process at every failpoint of docs/design.md §8 and check I1–I3 after recovery.

Each case: a file holds version A; the failpoint is armed (crash = exit 137 at once, as kill -9)
in one process; a write of version B runs; the crashed process is restarted clean. Then the
file must be exactly A or exactly B on every replica (B if the write was acknowledged: I2), every
listed replica holds the committed blob COMMITTED (I1), and once recovery has run no STAGED or
PREPARED blob is left anywhere (I3).
"""

from __future__ import annotations

import io
import json
import os

import pytest
import trio
from cluster import Cluster, run_trio

from dfs.rpc import Peer

NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "1", "--staged-timeout", "3")

# failpoint -> (process to arm, the outcomes the write may have, the version that must result
# when the write was not acknowledged: "A", "B", or "either")
CASES = {
    "coordinator.before_prepare": ("coordinator", "A"),
    "coordinator.before_decision": ("coordinator", "A"),
    "coordinator.after_decision": ("coordinator", "B"),
    "coordinator.mid_commit": ("coordinator", "B"),
    "node.after_stage": ("node-1", "A"),
    "node.before_vote": ("node-1", "A"),
    "node.before_commit_ack": ("node-1", "B"),
}


def replica_states(cluster: Cluster) -> dict[str, dict[int, str]]:
    """Every node's blobs and their states, asked of the running nodes over the wire."""

    async def ask() -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for name in cluster.node_names:
            peer = Peer(cluster.procs[name].address, cluster.secret)
            reply = await peer.call("list", after=0, limit=100_000, retry_for=10)
            out[name] = {int(b[0]): b[1] for b in reply["blobs"]}
            await peer.aclose()
        return out

    return trio.run(ask)


def stat(cluster: Cluster, path: str) -> dict:
    """What `dfs stat --json` prints (tests/test_cli.py runs the command), asked in-process:
    a `dfs` run costs ~0.6 s of interpreter start, and the cases here stat often."""

    async def ask() -> dict:
        async with cluster.client() as client:
            return {"path": path, **(await client.resolve(path)).to_json()}

    return json.loads(json.dumps(run_trio(ask)))


def write_through_library(cluster: Cluster, path: str, data: bytes) -> None:
    """A file's first version, written in-process (a `dfs put` costs ~0.6 s to start)."""

    async def write() -> None:
        async with cluster.client() as client:
            root = await client.resolve("/")
            attr = await client.create(root.ino, path.lstrip("/").encode(), 0o100644, 0, 0)
            await client.write_file(attr.ino, io.BytesIO(data))

    run_trio(write)
    # A write returns at its decision: its COMMITs may still be on their way. Armed next, a
    # node's commit failpoint must fire on the judged write B, not on a late COMMIT of A.
    cluster.wait_until(lambda: cluster.status().get("committing", 0) == 0, timeout=30,
                       message="version A's COMMITs all acked")


def assert_converged(cluster: Cluster, path: str, expect: bytes) -> None:
    """I1 + I3: the file reads as `expect`; every replica has its blob COMMITTED; no leftovers."""
    got = cluster.dfs("cat", path)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expect
    st = stat(cluster, path)
    ids = {cluster.node_id(name): name for name in cluster.node_names}

    def settled() -> dict[str, dict[int, str]] | None:
        states = replica_states(cluster)
        leftovers = [(n, b, s) for n, blobs in states.items() for b, s in blobs.items()
                     if s != "COMMITTED"]
        unacked = [r for r in st["replicas"] if states[ids[r]].get(st["blob"]) != "COMMITTED"]
        return None if leftovers or unacked else states

    cluster.wait_until(settled, timeout=30, interval=0.3,
                       message=f"replicas of {path} COMMITTED and no STAGED/PREPARED leftovers")


# A one-chunk write takes the short path of docs/design.md §5 rule 2: its STAGE carries the
# prepare fields, and the commit names the replicas that voted in it. These failpoints sit at
# its moments: both node points after the one forced write (PREPARED) before its reply; the
# coordinator's before any PREPARE (none is sent) and before the decision (reached at once).
ONE_CHUNK_CASES = ("coordinator.before_prepare", "coordinator.before_decision",
                   "node.after_stage", "node.before_vote")
MATRIX = [(f, "multi-chunk") for f in sorted(CASES)] + \
    [(f, "one-chunk") for f in ONE_CHUNK_CASES]


@pytest.mark.parametrize(("failpoint", "size"), MATRIX)
def test_crash_at_failpoint_leaves_old_or_new_version_everywhere(
    cluster_factory, failpoint: str, size: str
) -> None:
    process, _ = CASES[failpoint]
    crash_case(cluster_factory(node_args=NODE_ARGS), process, failpoint, size)


# The same matrix with the metadata in etcd (tests/ha_cluster.py, one coordinator that comes
# back on a fresh cache loaded from etcd): every coordinator failpoint, both write paths.
ETCD_MATRIX = [(f, s) for f, s in MATRIX if CASES[f][0] == "coordinator"]


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for the etcd cases: each crashes and restarts its coordinator, on its own
    file, and leaves the cluster whole."""
    from ha_cluster import HaCluster

    with HaCluster(tmp_path_factory.mktemp("ha"), coordinators=1, etcd_members=1,
                   node_args=NODE_ARGS).start() as cluster:
        yield cluster


@pytest.mark.parametrize(("failpoint", "size"), ETCD_MATRIX)
def test_crash_matrix_with_the_metadata_in_etcd(etcd_cluster: Cluster, failpoint: str,
                                                size: str) -> None:
    crash_case(etcd_cluster, "coordinator-1", failpoint, size,
               path=f"/{failpoint}-{size}")


def crash_case(cluster: Cluster, process: str, failpoint: str, size: str,
               path: str = "/f") -> None:
    """Version A, the failpoint armed in `process`, a write of B, `process` restarted clean:
    then exactly A or B everywhere (B if acknowledged)."""
    _, unacked_result = CASES[failpoint]
    if size == "one-chunk":
        a, b = os.urandom(4096), os.urandom(3000)
    else:
        a, b = os.urandom(3 * 1024 * 1024 + 17), os.urandom(2 * 1024 * 1024 + 5)
    write_through_library(cluster, path, a)  # only the write of B below is judged
    before = stat(cluster, path)

    cluster.restart(process, env={"DFS_FAILPOINTS": f"{failpoint}=crash"})
    cluster.wait_nodes_up()
    # A crashed coordinator stays down until restarted below: the put need not ride it out
    # for the CLI's default 5 s (it is judged the same way after 1 s).
    quick = {"DFS_RETRY_FOR": "1"} if process.startswith("coordinator") else None
    write = cluster.dfs("put", "-", path, input=b, timeout=90, env=quick)
    cluster.wait_until(lambda: not cluster.running(process), timeout=30,
                       message=f"{process} to crash at {failpoint}")
    cluster.restart(process, env={})
    cluster.wait_nodes_up()
    if size == "one-chunk" and process.startswith("node"):
        # It died with the copy forced PREPARED by the STAGE, before its reply (the vote): the
        # restarted node found it, and must resolve it (OUTCOME) for I3 below to hold.
        assert "recovery: 1 prepared, 0 staged blobs" in cluster.log(process, 400)

    acked = write.returncode == 0
    after = stat(cluster, path)
    if acked or unacked_result == "B":
        # I2: an acknowledged write is never lost; a decided one is finished after restart.
        assert after["version"] == before["version"] + 1
        assert_converged(cluster, path, b)
    else:
        assert write.stderr.count(b"\n") == 1, write.stderr
        assert after["version"] == before["version"]
        assert after["checksum"] == before["checksum"]
        assert_converged(cluster, path, a)


# A new file's first write: create (unwritten) and content are two requests, one decision
# shows both (docs/design.md §6). The coordinator's failpoints are where they could part.
NEW_FILE_CASES = sorted(f for f, (p, _) in CASES.items() if p == "coordinator")


@pytest.fixture(scope="module")
def new_file_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for the new-file cases: each crashes and restarts its coordinator, on its
    own path, and leaves the cluster whole."""
    cluster = Cluster(tmp_path_factory.mktemp("new-file"), node_args=NODE_ARGS)
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@pytest.mark.parametrize("failpoint", NEW_FILE_CASES)
def test_a_new_file_appears_with_its_content_or_not_at_all(new_file_cluster: Cluster,
                                                           failpoint: str) -> None:
    """`dfs put` of a new path, the coordinator crashed at each failpoint and restarted: to
    every other client the file is then exactly B, or not there; never empty."""
    cluster = new_file_cluster
    path = f"/new-{failpoint}"
    _, unacked_result = CASES[failpoint]
    b = os.urandom(2 * 1024 * 1024 + 5)
    cluster.restart("coordinator", env={"DFS_FAILPOINTS": f"{failpoint}=crash"})
    cluster.wait_nodes_up()
    write = cluster.dfs("put", "-", path, input=b, timeout=90, env={"DFS_RETRY_FOR": "1"})
    cluster.wait_until(lambda: not cluster.running("coordinator"), timeout=30,
                       message=f"coordinator to crash at {failpoint}")
    cluster.restart("coordinator", env={})
    cluster.wait_nodes_up()
    if write.returncode == 0 or unacked_result == "B":
        assert stat(cluster, path)["version"] == 1
        assert_converged(cluster, path, b)
        return
    assert write.stderr.count(b"\n") == 1, write.stderr
    got = cluster.dfs("cat", path)
    assert got.returncode == 1 and b"(ENOENT)" in got.stderr, got
    listed = cluster.dfs("ls", "/")
    assert listed.returncode == 0 and path[1:].encode() not in listed.stdout, listed.stdout


def test_write_with_one_of_four_nodes_dead_lands_on_the_other_three(cluster_factory) -> None:
    cluster = cluster_factory(nodes=4, node_args=NODE_ARGS)
    cluster.kill("node-2")
    data = os.urandom(1024 * 1024 + 1)
    result = cluster.dfs("put", "-", "/g", input=data, timeout=60)
    assert result.returncode == 0, result.stderr
    st = stat(cluster, "/g")
    assert cluster.node_id("node-2") not in st["replicas"]
    assert len(set(st["replicas"])) == 3
    assert cluster.dfs("cat", "/g").stdout == data


def test_write_with_too_few_live_nodes_fails_clearly_and_changes_nothing(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    assert cluster.dfs("put", "-", "/h", input=b"old").returncode == 0
    before = stat(cluster, "/h")
    cluster.kill("node-3")
    result = cluster.dfs("put", "-", "/h", input=b"new", timeout=90)
    assert result.returncode == 1
    line = result.stderr.decode()
    assert line.count("\n") == 1 and "Traceback" not in line
    assert stat(cluster, "/h")["version"] == before["version"]
    assert cluster.dfs("cat", "/h").stdout == b"old"


def test_a_write_staging_longer_than_the_txn_timeout_still_commits(cluster_factory) -> None:
    """A big write streams to the nodes for longer than --txn-timeout; the client's keepalive
    must keep the coordinator from expiring it (a 1 GiB dd through the mount hit this)."""
    cluster = cluster_factory(
        coordinator_args=("--node-timeout", "5", "--vote-timeout", "5", "--txn-timeout", "1.5"),
        node_args=NODE_ARGS,
        env={"node-1": {"DFS_FAILPOINTS": "node.after_stage=delay:400"}},
    )
    data = os.urandom(40 * 1024 * 1024)  # 40 chunks, 8 in flight: about 2 s of staging
    result = cluster.dfs("put", "-", "/slow", input=data, timeout=120)
    assert result.returncode == 0, result.stderr
    assert stat(cluster, "/slow")["version"] == 1
    assert cluster.dfs("cat", "/slow").stdout == data


def test_a_failing_or_full_replica_is_placed_around(cluster_factory) -> None:
    """One node refuses every stage (a failing disk) and another is full: with 5 nodes and
    R=3 every write still lands, on the healthy ones (found by the nemesis: such writes used
    to fail with the replica's error instead of being re-placed)."""
    cluster = cluster_factory(
        nodes=5, node_args=NODE_ARGS,
        env={"node-1": {"DFS_FAILPOINTS": "node.after_stage=error"}},
        extra_args={"node-2": ["--capacity", "65536"]},
    )
    bad = {cluster.node_id("node-1"), cluster.node_id("node-2")}
    for i in range(6):
        data = os.urandom(300_000 + i)
        result = cluster.dfs("put", "-", f"/p{i}", input=data, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not bad & set(stat(cluster, f"/p{i}")["replicas"])
        assert cluster.dfs("cat", f"/p{i}").stdout == data
    assert "failpoint node.after_stage fires" in cluster.log("node-1", 400), \
        "the failing node was never tried: the test proves nothing"
