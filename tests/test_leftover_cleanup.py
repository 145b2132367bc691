"""Leftovers do not outlive a coordinator crash (issue 8, item 7): after the coordinator dies
between STAGE and PREPARE, a restarted coordinator (a new incarnation) tells the nodes which
of their STAGED txids it does not know, and they drop them at once (presumed abort) instead of
after --staged-timeout (left at its 300 s default here). `dfs check` meanwhile tells cleanup in
progress from a real leftover (docs/checker.md)."""

from __future__ import annotations

import os
import signal
import threading
import time

from checker_helpers import COORDINATOR_ARGS, MiB, check, node_blobs, node_call

from dfs.checker.findings import Finding, Kind

NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "1", "--scrub-rate", "0")


def staged(cluster) -> dict[str, set[int]]:
    return {n: {b for b, s in node_blobs(cluster, n).items() if s == "STAGED"}
            for n in cluster.node_names}


def test_staged_leftovers_of_a_crashed_coordinator_go_at_its_restart(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    cluster.restart("coordinator", env={"DFS_FAILPOINTS": "coordinator.before_prepare=crash"})
    data = os.urandom(3 * MiB + 5)
    put = threading.Thread(target=cluster.dfs, args=("put", "-", "/big"),
                           kwargs={"input": data, "timeout": 60})
    put.start()
    cluster.wait_until(lambda: not cluster.running("coordinator"), timeout=20,
                       message="the coordinator crashing at its failpoint")
    left = staged(cluster)
    assert all(left.values()), f"every replica holds the STAGED chunks: {left}"

    cluster.restart("coordinator", env={})
    restarted = time.monotonic()
    cluster.wait_until(lambda: not any(staged(cluster).values()), timeout=5,
                       message="STAGED leftovers dropped after the coordinator restarted")
    print(f"leftovers gone {time.monotonic() - restarted:.2f} s after the restart")
    put.join(timeout=60)
    status, doc = check(cluster, "--deep")
    assert status == 0, doc
    assert not doc["cleanup_in_progress"], doc


def test_kill_9_of_the_coordinator_mid_write_leaves_nothing_behind(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    data = os.urandom(40 * MiB)
    put = threading.Thread(target=cluster.dfs, args=("put", "-", "/big"),
                           kwargs={"input": data, "timeout": 90})
    put.start()
    cluster.wait_until(lambda: any(staged(cluster).values()), timeout=20, interval=0.02,
                       message="the client staging its chunks")
    cluster.kill("coordinator", signal.SIGKILL)
    old = set().union(*staged(cluster).values())
    cluster.restart("coordinator")
    restarted = time.monotonic()
    cluster.wait_until(lambda: not old & set().union(*staged(cluster).values()), timeout=5,
                       message="the crashed coordinator's STAGED leftovers dropped")
    print(f"leftovers gone {time.monotonic() - restarted:.2f} s after the restart")
    put.join(timeout=90)  # the client may start over and finish with a new transaction
    cluster.wait_until(lambda: not any(staged(cluster).values()), timeout=10,
                       message="no STAGED blob left once the client is done")
    status, doc = check(cluster, "--deep")
    assert status == 0, doc


def test_the_checker_tells_cleanup_in_progress_from_a_real_leftover() -> None:
    from dfs.checker.scan import split_cleanup

    young = Finding(Kind.STAGED, None, 1, 10, "STAGED blob 10")
    old = Finding(Kind.PREPARED, None, 1, 11, "PREPARED blob 11")
    gone = Finding(Kind.STAGED, None, 2, 12, "STAGED blob 12")
    orphan = Finding(Kind.ORPHAN, None, 2, 13, "COMMITTED blob 13")
    writing = Finding(Kind.STAGED, None, 3, 14, "STAGED blob 14")
    ages = {(1, 10): {"state": "STAGED", "idle_s": 1.0, "horizon_s": 4.0},
            (1, 11): {"state": "PREPARED", "idle_s": 50.0, "horizon_s": 20.0}}
    findings, cleaning = split_cleanup([young, old, gone, orphan], [writing], ages)
    assert findings == [old, orphan]
    assert {(c["blob"], c["why"]) for c in cleaning} == {
        (10, "younger than the node's cleanup horizon"), (14, "in flight at the coordinator")}


def test_a_leftover_being_cleaned_is_not_a_finding(cluster_factory) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS, coordinator_args=COORDINATOR_ARGS)
    txid = 10**9  # never allocated: the coordinator does not know it
    node_call(cluster, "node-1", "stage", txid=txid, index=0, data=b"nobody's bytes")
    status, doc = check(cluster)
    assert status == 0, doc
    listed = {c["blob"] for c in doc["cleanup_in_progress"]}
    assert txid in listed or txid not in node_blobs(cluster, "node-1"), doc
    cluster.wait_until(lambda: txid not in node_blobs(cluster, "node-1"), timeout=10,
                       message="the node dropping the leftover itself")
