"""kill -9 the coordinator and the repairing `dfs check --repair` in the middle of a repair:
after a restart, a new `dfs check --repair` converges and no file was damaged (a crash leaves
every file as before or fixed, never worse; docs/checker.md)."""

from __future__ import annotations

import signal
import subprocess

import pytest
from checker_helpers import NODE_ARGS, all_stats, check, node_call, put_files, read_all

from dfs.cli.procs import DFS

CASES = {
    # failpoint in the coordinator -> how the crash comes
    "repair.after_fetch": "delay:4000",  # kill -9 both while targets hold STAGED copies
    "repair.before_decision": "crash",  # targets PREPARED, no decision
    "repair.after_decision": "crash",  # decision durable, COMMIT not sent
}


@pytest.mark.parametrize("failpoint", sorted(CASES))
def test_kill9_coordinator_and_checker_mid_repair(cluster_factory, failpoint: str) -> None:
    cluster = cluster_factory(node_args=NODE_ARGS)
    files = put_files(cluster, 12, big=3 * 1024 * 1024)
    stats = all_stats(cluster, list(files))
    # Every file loses its copy on node-2 (one request).
    node_call(cluster, "node-2", "delete", blobs=[st["blob"] for st in stats.values()])
    status, doc = check(cluster)
    assert status == 3 and len(doc["findings"]) == len(files)

    action = CASES[failpoint]
    cluster.restart("coordinator", env={"DFS_FAILPOINTS": f"{failpoint}={action}"})
    repairing = subprocess.Popen([*DFS, "check", "--repair"], env=cluster.cli_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
    try:
        if action == "crash":
            cluster.wait_until(lambda: not cluster.running("coordinator"), timeout=30,
                               message=f"coordinator crash at {failpoint}")
        else:
            cluster.wait_until(lambda: "failpoint repair.after_fetch fires" in
                               cluster.log("coordinator", 200), timeout=30,
                               message="a repair in the middle of its copy")
            cluster.kill("coordinator")
    finally:
        if repairing.poll() is None:
            repairing.send_signal(signal.SIGKILL)
        repairing.wait(10)
        repairing.stdout.close()
        repairing.stderr.close()

    cluster.restart("coordinator", env={})
    status, doc = check(cluster, "--repair")
    assert status == 0, doc
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["clean"], doc
    after = all_stats(cluster, list(files))
    assert {p: (st["version"], st["blob"]) for p, st in after.items()} == \
        {p: (st["version"], st["blob"]) for p, st in stats.items()}
    assert read_all(cluster, list(files)) == files
