"""The crash matrix of DESIGN.md §8 for a multi-file commit (real processes, kill -9 at each
failpoint): three files written in one transaction are afterwards all old or all new, on
every replica; and a NO vote (a full node) on one member commits none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cluster import Cluster
from test_faults import NODE_ARGS, assert_converged, stat

FILES = ("/x", "/y", "/z")
# failpoint -> (process to arm, what the files must hold when the commit was not acked)
CASES = {
    "coordinator.before_prepare": ("coordinator", "A"),
    "coordinator.before_decision": ("coordinator", "A"),
    "coordinator.after_decision": ("coordinator", "B"),
    "coordinator.mid_commit": ("coordinator", "B"),
    "node.before_vote": ("node-1", "A"),
    "node.before_commit_ack": ("node-1", "B"),
}


def put_atomic(cluster: Cluster, tmp: Path, contents: list[bytes], *extra: str,
               timeout: float = 90, env: dict[str, str] | None = None):
    args: list[str | Path] = []
    for path, data in zip(FILES, contents, strict=True):
        src = tmp / f"src{path.replace('/', '-')}-{os.urandom(4).hex()}"
        src.write_bytes(data)
        args += [src, path]
    return cluster.dfs("put", "--atomic", *args, *extra, timeout=timeout, env=env)


@pytest.mark.parametrize("failpoint", sorted(CASES))
def test_crash_during_a_three_file_commit_leaves_all_old_or_all_new(
        cluster_factory, tmp_path: Path, failpoint: str) -> None:
    process, unacked_result = CASES[failpoint]
    cluster = cluster_factory(node_args=NODE_ARGS)
    # Over one chunk each: the coordinator sends PREPARE (no vote in the STAGE).
    a = [os.urandom(1024 * 1024 + 100 + i) for i in range(3)]
    b = [os.urandom(1024 * 1024 + 300 + i) for i in range(3)]
    first = put_atomic(cluster, tmp_path, a)
    assert first.returncode == 0, first.stderr
    before = {p: stat(cluster, p)["version"] for p in FILES}

    cluster.restart(process, env={"DFS_FAILPOINTS": f"{failpoint}=crash"})
    # A crashed coordinator stays down until restarted below: no need to ride it out for
    # the CLI's default 5 s.
    quick = {"DFS_RETRY_FOR": "1"} if process == "coordinator" else None
    write = put_atomic(cluster, tmp_path, b, env=quick)
    cluster.wait_until(lambda: not cluster.running(process), timeout=30,
                       message=f"{process} to crash at {failpoint}")
    cluster.restart(process, env={})

    after = {p: stat(cluster, p)["version"] for p in FILES}
    new = [after[p] == before[p] + 1 for p in FILES]
    assert all(new) or not any(new), f"a mix after {failpoint}: {before} -> {after}"
    if write.returncode == 0 or unacked_result == "B":
        assert all(new), "an acknowledged or decided transaction is never lost (I2)"
    elif unacked_result == "A" and process == "coordinator":
        assert not any(new)
        assert write.stderr.count(b"\n") == 1, write.stderr
    expect = b if all(new) else a
    for path, data in zip(FILES, expect, strict=True):
        assert_converged(cluster, path, data)


def test_a_no_vote_on_one_member_commits_none(cluster_factory, tmp_path: Path) -> None:
    """node-3 is full (64 KiB): the one big member cannot be staged or prepared there, and
    the small members already prepared everywhere are aborted with it."""
    cluster = cluster_factory(node_args=NODE_ARGS,
                              extra_args={"node-3": ["--capacity", "65536"]})
    small = [b"a1", b"b1", b"c1"]
    assert put_atomic(cluster, tmp_path, small).returncode == 0
    result = put_atomic(cluster, tmp_path, [b"a2", os.urandom(300_000), b"c2"])
    assert result.returncode == 1
    line = result.stderr.decode()
    assert line.count("\n") == 1 and "Traceback" not in line, line
    for path, data in zip(FILES, small, strict=True):
        assert stat(cluster, path)["version"] == 1
        assert cluster.dfs("cat", path).stdout == data
    assert_converged(cluster, FILES[0], small[0])
