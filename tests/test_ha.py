"""Standby coordinators over etcd (docs/operations.md, "Standby coordinators"): real etcd
members, real coordinators and nodes on loopback, faults by pid and by proxy.

What a user relies on: a leader killed or cut off from etcd loses no acknowledged write and
leaves every file at one whole version on every replica; writes resume on the standby; an
etcd that lost its majority stops writes with UNAVAILABLE (no hang) and they resume after.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from checker_helpers import check
from ha_cluster import HaCluster

from dfs.cli.procs import DFS, Child
from dfs.client import Client
from dfs.errors import DfsError

WRITERS = 4
FAILOVER_LIMIT = 20.0  # s: liveness bound for a test machine (the figure is measured apart)


class Ledger:
    """What each writer tried and what was acknowledged, per file."""

    def __init__(self) -> None:
        self.acked: dict[int, list[tuple[int, bytes]]] = {}
        self.tried: dict[int, list[bytes]] = {}
        self.failed = 0
        self.last_ack = 0.0

    def allowed(self, i: int) -> list[bytes]:
        """Contents the file may hold now: its last acknowledged one, or one tried after it."""
        tried = self.tried.get(i, [])
        acked = self.acked.get(i, [])
        if not acked:
            return tried
        last = acked[-1][1]
        return tried[tried.index(last):]


async def _write_loop(client: Client, ino: int, i: int, ledger: Ledger,
                      stop: trio.Event) -> None:
    n = 0
    while not stop.is_set():
        data = f"writer {i} write {n}\n".encode() + os.urandom(1500 + 97 * n % 3000)
        ledger.tried.setdefault(i, []).append(data)
        try:
            attr = await client.write_file(ino, io.BytesIO(data))
            ledger.acked.setdefault(i, []).append((attr.version, data))
            ledger.last_ack = time.monotonic()
        except DfsError:
            ledger.failed += 1
            await trio.sleep(0.05)
        n += 1


async def _writes_through(cluster: HaCluster, fault, *, after: float = 1.0,
                          settle: float = 1.5) -> tuple[Ledger, float, dict[int, int]]:
    """Writers run; `fault()` (sync, in a thread) strikes; writers go on until a write is
    acknowledged after the fault (the resume time) and `settle` more seconds."""
    ledger = Ledger()
    stop = trio.Event()
    async with cluster.client(retry_for=30) as client:
        root = await client.resolve("/")
        inos = {}
        for i in range(WRITERS):
            inos[i] = (await client.create(root.ino, f"w{i}".encode(), 0o100644, 0, 0)).ino
        async with trio.open_nursery() as nursery:
            for i in range(WRITERS):
                nursery.start_soon(_write_loop, client, inos[i], i, ledger, stop)
            await trio.sleep(after)
            await trio.to_thread.run_sync(fault)
            struck = time.monotonic()
            with trio.fail_after(FAILOVER_LIMIT):
                while ledger.last_ack <= struck:
                    await trio.sleep(0.05)
            resumed = ledger.last_ack - struck
            await trio.sleep(settle)
            stop.set()
    return ledger, resumed, inos


def _assert_no_write_lost(cluster: HaCluster, ledger: Ledger, inos: dict[int, int]) -> None:
    async def read() -> dict[int, bytes]:
        out = {}
        async with cluster.client() as client:
            for i, ino in inos.items():
                sink = io.BytesIO()
                await client.read_file(await client.getattr(ino), sink)
                out[i] = sink.getvalue()
        return out

    contents = trio.run(read)
    for i, data in contents.items():
        assert data in ledger.allowed(i), f"file w{i} holds neither its last acknowledged " \
                                          f"write nor a later one"
    # Every file at one whole version on every replica, nothing left over: the judge first.
    status, doc = check(cluster, "--deep")
    assert status == 0 and doc["findings"] == [], doc["findings"]


@pytest.fixture
def ha(tmp_path: Path):
    with HaCluster(tmp_path / "ha", node_args=("--heartbeat-interval", "0.2",
                                               "--outcome-after", "1")).start() as cluster:
        yield cluster


def test_standby_names_the_leader_and_status_shows_etcd(ha: HaCluster) -> None:
    leader = ha.leader()
    assert leader == "coordinator-1"
    doc = ha.status()
    meta = doc["meta"]
    assert meta["store"] == "etcd" and meta["leader"] == ha.addresses["coordinator-1"]
    assert [m["healthy"] for m in meta["members"]] == [True, True, True]
    assert sum(bool(m.get("leader")) for m in meta["members"]) == 1
    # The CLI given only the standby's address still works: it follows the leader.
    put = ha.dfs("put", "-", "/via-standby", input=b"x" * 100,
                 env={"DFS_COORDINATOR": ha.addresses["coordinator-2"]})
    assert put.returncode == 0, put.stderr
    assert ha.dfs("cat", "/via-standby").stdout == b"x" * 100
    roles = {c["address"]: c["role"] for c in doc["coordinators"]}
    assert roles == {ha.addresses["coordinator-1"]: "leader",
                     ha.addresses["coordinator-2"]: "standby"}, doc["coordinators"]
    text = ha.dfs("status")
    assert b"metadata in etcd" in text.stdout, text.stdout
    assert f"{ha.addresses['coordinator-2']} standby".encode() in text.stdout, text.stdout


def test_leader_killed_during_writes_loses_no_acknowledged_write(ha: HaCluster) -> None:
    first = ha.leader()
    assert first is not None
    ledger, resumed, inos = trio.run(
        _writes_through, ha, lambda: ha.kill(first, signal.SIGKILL))
    second = ha.wait_leader(other_than=first)
    assert second != first
    assert sum(len(a) for a in ledger.acked.values()) > WRITERS
    # The standby had followed the writes in its own cache, so it only caught up (no load
    # of the whole namespace); what it then serves is checked below like any takeover.
    took_over = [line for line in ha.log(second, 400).splitlines() if "taking over" in line]
    assert len(took_over) == 1 and "the standby's cache" in took_over[0], took_over
    followed = int(took_over[0].split(" changes followed")[0].rsplit(" ", 1)[1])
    assert followed > 0, took_over
    _assert_no_write_lost(ha, ledger, inos)
    ha.restart(first)  # back as a standby
    assert ha.leader() != first


def test_leader_cut_off_from_etcd_cannot_decide(tmp_path: Path) -> None:
    """coordinator-1 reaches etcd only through proxies; they hold its traffic (it still
    reaches the nodes), then let the held requests through late: none of them may land."""
    with HaCluster(tmp_path / "ha", proxied=["coordinator-1"],
                   node_args=("--heartbeat-interval", "0.2", "--outcome-after", "1")
                   ).start() as cluster:
        assert cluster.leader() == "coordinator-1"
        ledger, resumed, inos = trio.run(
            _writes_through, cluster, lambda: cluster.cut_off("coordinator-1"))
        assert cluster.wait_leader(other_than="coordinator-1") == "coordinator-2"
        cluster.heal("coordinator-1")  # its held etcd requests arrive now, fenced out
        time.sleep(1.0)
        assert "stepping down" in cluster.log("coordinator-1", 400)
        assert cluster.leader() == "coordinator-2"
        _assert_no_write_lost(cluster, ledger, inos)


def test_a_decision_whose_etcd_reply_is_lost_is_neither_failed_nor_aborted(
        tmp_path: Path) -> None:
    """HA nemesis seed 9: the leader wrote a decision to etcd and the reply was lost. It told
    the writer UNAVAILABLE (the writer retried, and reported "failed" a write that the next
    leader then committed) and its nodes abort (a version decided with no copy anywhere).
    Now it leaves the commit unanswered and steps down: the writer asks the next leader,
    which says committed, and the file's version is that write, once, on every replica."""
    with HaCluster(tmp_path / "ha", proxied=["coordinator-1"],
                   node_args=("--heartbeat-interval", "0.2", "--outcome-after", "1")
                   ).start() as cluster:
        assert cluster.leader() == "coordinator-1"

        async def write() -> Any:
            async with cluster.client(retry_for=30) as client:
                root = await client.resolve("/")
                ino = (await client.create(root.ino, b"f", 0o100644, 0, 0)).ino
                await client.write_file(ino, io.BytesIO(b"first"))
                for proxy in cluster.proxies["coordinator-1"]:
                    proxy.mode = "drop-txn"  # its etcd writes land; their replies are lost
                attr = await client.write_file(ino, io.BytesIO(b"second"))
                sink = io.BytesIO()
                await client.read_file(await client.getattr(ino), sink)
                return attr, sink.getvalue()

        attr, data = trio.run(write)
        assert (attr.version, data) == (2, b"second"), (attr, data)
        status, doc = check(cluster, "--deep")
        assert status == 0 and doc["findings"] == [], doc["findings"]
        assert "in doubt" in cluster.log("coordinator-1", 400)
        assert cluster.wait_leader(other_than="coordinator-1") == "coordinator-2"


def test_a_takeover_that_outlasts_the_lease_still_leads(tmp_path: Path) -> None:
    """Loading the cache of a large namespace takes seconds, several lease TTLs (1 s here):
    the lease is renewed meanwhile, so the elected coordinator leads rather than stand by."""
    slow = {"DFS_FAILPOINTS": "coordinator.takeover=delay:3000"}
    with HaCluster(tmp_path / "ha", coordinators=1, env={"coordinator-1": slow}).start() as c:
        assert c.wait_leader() == "coordinator-1"
        put = c.dfs("put", "-", "/after-a-slow-takeover", input=b"led", timeout=60)
        assert put.returncode == 0, put.stderr
        assert "stepping down" not in c.log("coordinator-1", 400)


def test_etcd_without_a_majority_stops_writes_then_they_resume(ha: HaCluster) -> None:
    assert ha.dfs("put", "-", "/before", input=b"before").returncode == 0
    # One of three goes, etcd's leader itself (the worse case): a majority is left. Until it
    # elects a new leader etcd answers nothing, which may outlast the coordinator's lease
    # (1 s here): the write must still land, through a step-down and a takeover if need be.
    first = ha.etcd.leader_index()
    ha.etcd.kill(first)
    one_down = ha.dfs("put", "-", "/one-down", input=b"one down", timeout=60)
    assert one_down.returncode == 0, one_down.stderr
    second = next(i for i in range(3) if i != first)
    ha.etcd.kill(second)  # now two of three: no majority
    start = time.monotonic()
    stuck = ha.dfs("put", "-", "/no-majority", input=b"lost?", timeout=90)
    assert stuck.returncode == 1, stuck.stderr
    assert stuck.stderr.count(b"\n") == 1, stuck.stderr  # one line, no traceback
    assert b"unavailable" in stuck.stderr.lower(), stuck.stderr
    assert time.monotonic() - start < 60  # an error, not a hang
    ha.etcd.restart(first)
    ha.etcd.restart(second)
    ha.wait_leader()
    after = ha.dfs("put", "-", "/after", input=b"after", timeout=60)
    assert after.returncode == 0, after.stderr
    for path, data in (("/before", b"before"), ("/one-down", b"one down"), ("/after", b"after")):
        assert ha.dfs("cat", path).stdout == data


def test_meta_migrate_moves_an_lmdb_cluster_into_etcd(cluster_factory, tmp_path: Path) -> None:
    from etcd_harness import EtcdCluster

    cluster = cluster_factory()
    for i in range(20):
        assert cluster.dfs("put", "-", f"/m{i}", input=f"file {i}".encode()).returncode == 0
    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        url = "etcd://" + ",".join(etcd.endpoints)
        data = cluster.data_dir("coordinator")
        refused = cluster.dfs("meta", "migrate", "--data", data, "--to", url)
        assert refused.returncode == 1 and b"coordinator is running" in refused.stderr
        cluster.stop("coordinator")
        moved = cluster.dfs("meta", "migrate", "--data", data, "--to", url, "--json")
        assert moved.returncode == 0, moved.stderr
        assert json.loads(moved.stdout)["keys"] > 20
        again = cluster.dfs("meta", "migrate", "--data", data, "--to", url)
        assert again.returncode == 1 and b"no coordinator LMDB" in again.stderr, again.stderr
        cluster.restart("coordinator", args=["--meta", url])
        for i in range(20):
            assert cluster.dfs("cat", f"/m{i}").stdout == f"file {i}".encode()
        assert cluster.dfs_json("status")["meta"]["store"] == "etcd"


def _two_free_ports() -> int:
    """A port free together with the next one (`--ha` takes both), from the OS."""
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return int(port)
            except OSError:
                continue


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_local_up_ha_runs_etcd_and_two_coordinators(tmp_path: Path, tls: bool) -> None:
    """With --tls every link is TLS, the coordinators' links to etcd and etcd's own too."""
    from etcd_harness import require_etcd

    require_etcd()
    port = _two_free_ports()
    coordinators = f"127.0.0.1:{port},127.0.0.1:{port + 1}"
    up = Child("local-up", [*DFS, "local", "up", "--ha", "--dir", str(tmp_path / "c"),
                            "--coordinator", f"127.0.0.1:{port}", *(["--tls"] if tls else [])],
               tmp_path / "up.log")
    up.start()
    try:
        deadline = time.monotonic() + 90
        while b"use it from another shell" not in (tmp_path / "up.log").read_bytes():
            assert up.poll() is None, up.log_tail(20)
            assert time.monotonic() < deadline, up.log_tail(20)
            time.sleep(0.2)
        certs = tmp_path / "c" / "tls"
        env = {**os.environ, "DFS_COORDINATOR": coordinators,
               "DFS_SECRET_FILE": str(tmp_path / "c" / "secret"),
               **({"DFS_TLS_CERT": str(certs / "client.crt"),
                   "DFS_TLS_KEY": str(certs / "client.key"),
                   "DFS_TLS_CA": str(certs / "ca.crt")} if tls else {})}
        run = lambda *a, **k: subprocess.run([*DFS, *a], env=env, capture_output=True,  # noqa: E731
                                             timeout=60, **k)
        assert run("put", "-", "/ha", input=b"hello").returncode == 0
        status = json.loads(run("status", "--json").stdout)
        assert status["meta"]["store"] == "etcd"
        members = status["meta"]["members"]
        assert len(members) == 3 and all(m["healthy"] for m in members), members
        assert run("cat", "/ha").stdout == b"hello"
        scheme = "https://" if tls else "http://"
        assert all(m["endpoint"].startswith(scheme) for m in members), members
        if tls:  # etcd answers neither plain HTTP nor TLS without a certificate of the CA
            from dfs.etcd.client import EtcdClient, EtcdError

            endpoint = members[0]["endpoint"].removeprefix("https://")
            with pytest.raises(EtcdError):
                EtcdClient([endpoint], timeout=1.0).range(b"/")
            import ssl

            with pytest.raises(EtcdError):
                EtcdClient([endpoint], timeout=1.0, tls=ssl.create_default_context(
                    cafile=str(certs / "ca.crt"))).range(b"/")
    finally:
        up.stop()
    assert up.poll() is not None


def test_local_up_ha_keeps_serving_and_restarts_a_killed_leader(tmp_path: Path) -> None:
    """The first thing a user does to watch a failover: kill -9 the leading coordinator of
    `dfs local up --ha`, started with the coordinators' list exported as DFS_COORDINATOR as
    the README says. The standby takes over (a write through the CLI succeeds), local up
    keeps running and starts the killed coordinator again, which answers again (issue 17)."""
    from etcd_harness import free_port, require_etcd
    from local_up import LocalUp

    require_etcd()
    listed = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"  # any two ports, as exported
    with LocalUp(tmp_path, "--ha", "--nodes", "2", "--replicas", "2",
                 env={"DFS_COORDINATOR": listed}) as up:
        assert up.coordinators == listed

        def roles() -> dict[str, str]:
            return {c["address"]: c["role"] for c in (up.status() or {}).get("coordinators", [])}

        leader = up.wait_until(lambda: next((a for a, r in roles().items() if r == "leader"),
                                            None), 30, "a leader")
        name = next(n for n, a in up.addresses().items() if a == leader)
        old = up.pids()[name]
        os.kill(old, signal.SIGKILL)
        up.wait_until(lambda: up.dfs("put", "-", "/after", input=b"failover").returncode == 0,
                      FAILOVER_LIMIT, "write after the leader was killed")
        assert up.dfs("cat", "/after").stdout == b"failover"
        up.wait_restarted(name, old)
        up.wait_until(lambda: roles().get(leader) in ("leader", "standby"), 30,
                      f"{name} answering at {leader} again")
        assert up.child.running()
        assert up.stop() == 0, up.log()
    assert up.leftovers() == []


def test_an_unreachable_etcd_is_one_clear_line_at_start(tmp_path: Path) -> None:
    from etcd_harness import free_port

    start = time.monotonic()
    result = subprocess.run(
        [*DFS, "--secret-file", str(_secret(tmp_path)), "coordinator", "--data",
         str(tmp_path / "c"), "--listen", "127.0.0.1:0", "--meta",
         f"etcd://127.0.0.1:{free_port()}"], capture_output=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr, result.stderr
    assert b"etcd" in result.stderr
    assert time.monotonic() - start < 30


def test_status_warns_before_the_etcd_quota_is_hit(tmp_path: Path) -> None:
    from cluster import COORDINATOR_ARGS

    with HaCluster(tmp_path / "ha", coordinators=1, etcd_members=1, nodes=3,
                   coordinator_args=[*COORDINATOR_ARGS, "--etcd-quota", "25000"]
                   ).start() as cluster:
        meta = cluster.status()["meta"]
        assert meta["db_size"] > 0.8 * 25_000 and meta["quota_warning"] is True, meta
        assert meta["quota"] == 25_000
        assert b"near etcd's quota" in cluster.dfs("status").stdout


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex() + "\n")
    return path
