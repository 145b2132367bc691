"""The real `dfs` command against a real cluster (coordinator + 3 nodes, R=3) on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash
from cluster import Cluster
from etcd_harness import TcpProxy
from local_up import LocalUp

from dfs.cli.procs import DFS, LISTENING, RESTART_MIN_S, Child, Supervisor

MiB = 1024 * 1024


def ok(result) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def one_line_error(result, code: int = 1) -> str:
    """A failure: the exit code, and exactly one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr.decode())
    err = result.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("size", [0, 1, MiB, 5 * MiB + 1])
def test_put_get_round_trip(shared_cluster: Cluster, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    path = f"/round-{size}"
    ok(shared_cluster.dfs("put", src, path))
    dest = tmp_path / "dest"
    ok(shared_cluster.dfs("get", path, dest))
    assert dest.read_bytes() == data
    assert ok(shared_cluster.dfs("cat", path)) == data
    doc = shared_cluster.dfs_json("stat", path)
    assert doc["size"] == size and doc["version"] == 1


def test_put_from_stdin_and_overwrite(shared_cluster: Cluster) -> None:
    ok(shared_cluster.dfs("put", "-", "/stdin", input=b"first"))
    ok(shared_cluster.dfs("put", "-", "/stdin", input=b"second version"))
    assert ok(shared_cluster.dfs("cat", "/stdin")) == b"second version"
    assert shared_cluster.dfs_json("stat", "/stdin")["version"] == 2


def test_get_default_dest_and_into_directory(shared_cluster: Cluster, tmp_path: Path) -> None:
    ok(shared_cluster.dfs("put", "-", "/named", input=b"abc"))
    ok(shared_cluster.dfs("get", "/named", cwd=tmp_path))
    assert (tmp_path / "named").read_bytes() == b"abc"
    (tmp_path / "d").mkdir()
    ok(shared_cluster.dfs("get", "/named", tmp_path / "d"))
    assert (tmp_path / "d" / "named").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_get_into_a_device_or_fifo_writes_into_it(shared_cluster: Cluster,
                                                  tmp_path: Path) -> None:
    """`dfs get f /dev/null` must not put a regular file where the device was (the rename a
    regular destination gets would; every later reader of /dev/null then read old output)."""
    ok(shared_cluster.dfs("put", "-", "/into-dev", input=b"x" * 5000))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        ok(shared_cluster.dfs("get", "/into-dev", fifo))
        assert reader.communicate(timeout=30)[0] == b"x" * 5000
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert fifo.is_fifo()
    if os.geteuid() == 0:  # a null device of our own (never the machine's), and a symlink
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (tmp_path / "link").symlink_to(tmp_path / "null")
        for target in (tmp_path / "null", tmp_path / "link"):
            ok(shared_cluster.dfs("get", "/into-dev", target))
            assert target.is_char_device(), target
        assert (tmp_path / "link").is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stat_json(shared_cluster: Cluster) -> None:
    data = os.urandom(3 * MiB + 17)
    ok(shared_cluster.dfs("put", "-", "/statme", input=data))
    doc = shared_cluster.dfs_json("stat", "/statme")
    assert doc["path"] == "/statme"
    assert doc["type"] == "file"
    assert doc["version"] == 1
    assert doc["size"] == len(data)
    assert doc["checksum"] == xxhash.xxh3_128_digest(data).hex()
    node_ids = {n["id"] for n in shared_cluster.status()["nodes"]}
    assert len(doc["replicas"]) == 3 and set(doc["replicas"]) <= node_ids


def test_status_and_lists_json(shared_cluster: Cluster) -> None:
    doc = shared_cluster.status()
    assert doc["replicas"] == 3
    assert len(doc["nodes"]) == 3
    for node in doc["nodes"]:
        assert {"id", "address", "state", "used", "capacity"} <= node.keys()
        assert node["state"] == "up"
    assert len(shared_cluster.dfs_json("node", "list")["nodes"]) == 3
    assert isinstance(shared_cluster.dfs_json("txn", "list")["txns"], list)
    human = ok(shared_cluster.dfs("status")).decode()
    assert "replicas 3" in human and "up" in human


def test_mkdir_ls_mv_rm(shared_cluster: Cluster) -> None:
    c = shared_cluster
    ok(c.dfs("mkdir", "/tour"))
    ok(c.dfs("mkdir", "-p", "/tour/a/b/c"))
    ok(c.dfs("mkdir", "-p", "/tour/a/b"))  # existing is fine with -p
    ok(c.dfs("put", "-", "/tour/a/f", input=b"x"))
    names = {e["name"]: e for e in c.dfs_json("ls", "/tour/a")["entries"]}
    assert names.keys() == {"b", "f"}
    assert names["b"]["type"] == "dir" and names["f"]["size"] == 1
    assert "f" in ok(c.dfs("ls", "/tour/a")).decode()
    ok(c.dfs("mv", "/tour/a/f", "/tour/g"))
    ok(c.dfs("mv", "/tour/g", "/tour/a/b"))  # into a directory: keeps the name
    assert ok(c.dfs("cat", "/tour/a/b/g")) == b"x"
    one_line_error(c.dfs("rmdir", "/tour/a/b"))  # not empty
    ok(c.dfs("rm", "/tour/a/b/g"))
    ok(c.dfs("rmdir", "/tour/a/b/c"))
    ok(c.dfs("rmdir", "/tour/a/b"))
    assert [e["name"] for e in c.dfs_json("ls", "/tour/a")["entries"]] == []
    err = one_line_error(c.dfs("cat", "/tour/a/b/g"))
    assert err.startswith("dfs: /tour/a/b/g: ") and "ENOENT" in err


def test_put_into_directory_uses_the_source_name(shared_cluster: Cluster, tmp_path: Path) -> None:
    ok(shared_cluster.dfs("mkdir", "/into"))
    src = tmp_path / "report.txt"
    src.write_bytes(b"report")
    ok(shared_cluster.dfs("put", src, "/into"))
    assert ok(shared_cluster.dfs("cat", "/into/report.txt")) == b"report"


def test_failures_are_one_line_with_status_1(shared_cluster: Cluster, tmp_path: Path) -> None:
    c = shared_cluster
    err = one_line_error(c.dfs("cat", "/no/such/file"))
    assert err.startswith("dfs: /no/such/file: ")
    err = one_line_error(c.dfs("put", tmp_path / "missing", "/x"))
    assert "missing" in err and "No such file" in err
    one_line_error(c.dfs("put", "-", "/no-parent/x", input=b""))
    one_line_error(c.dfs("mkdir", "/"))
    ok(c.dfs("mkdir", "/exists"))
    assert "EEXIST" in one_line_error(c.dfs("mkdir", "/exists"))
    assert "EISDIR" in one_line_error(c.dfs("cat", "/exists"))
    # Names read as text, never as a Python bytes repr (issue 21).
    ok(c.dfs("put", "-", "/exists/f", input=b"x"))
    err = one_line_error(c.dfs("rmdir", "/exists"))
    assert err.strip() == 'dfs: /exists: "exists" is not empty (ENOTEMPTY)', err
    err = one_line_error(c.dfs("rm", "/exists"))
    assert '"exists" is a directory' in err and "b'" not in err, err


def test_bad_usage_is_status_2(shared_cluster: Cluster) -> None:
    c = shared_cluster
    one_line_error(c.dfs("frobnicate"), 2)
    one_line_error(c.dfs("put", "only-one-arg"), 2)
    one_line_error(c.dfs("ls", "--no-such-flag"), 2)
    one_line_error(c.dfs("put", "-", "/x", "--if-version", "notanumber"), 2)
    err = one_line_error(c.dfs("ls", "relative/path"), 2)
    assert "start with /" in err


def test_unreachable_coordinator(shared_cluster: Cluster) -> None:
    result = shared_cluster.dfs("--coordinator", "127.0.0.1:1", "ls", "/")
    assert "UNAVAILABLE" in one_line_error(result)


def test_wrong_secret_is_auth(shared_cluster: Cluster, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_text(os.urandom(32).hex())
    result = shared_cluster.dfs("ls", "/", env={"DFS_SECRET_FILE": str(wrong)})
    assert "AUTH" in one_line_error(result)
    result = shared_cluster.dfs("--secret-file", wrong, "status")
    assert "AUTH" in one_line_error(result)


def test_if_version(shared_cluster: Cluster) -> None:
    c = shared_cluster
    ok(c.dfs("put", "-", "/cas", "--if-version", "0", input=b"v1"))
    ok(c.dfs("put", "-", "/cas", "--if-version", "1", input=b"v2"))
    err = one_line_error(c.dfs("put", "-", "/cas", "--if-version", "1", input=b"stale"))
    assert "CONFLICT" in err
    assert ok(c.dfs("cat", "/cas")) == b"v2"
    assert json.loads(ok(c.dfs("stat", "/cas", "--json")))["version"] == 2
    err = one_line_error(c.dfs("put", "-", "/cas-missing", "--if-version", "3", input=b"x"))
    assert "CONFLICT" in err


# ---------------------------------------------------------------- without a cluster


def run_dfs(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DFS_")}
    return subprocess.run([*DFS, *args], capture_output=True, env={**base, **(env or {})},
                          timeout=60, **kw)


def test_usage_errors_without_a_cluster() -> None:
    assert b"usage: dfs" in run_dfs("--help").stdout
    one_line_error(run_dfs(), 2)
    one_line_error(run_dfs("node", "drain"), 2)
    one_line_error(run_dfs("node", "drain", "x"), 2)
    one_line_error(run_dfs("txn"), 2)
    one_line_error(run_dfs("local", "up", "--nodes", "many"), 2)


def test_no_secret_is_one_line(tmp_path: Path) -> None:
    err = one_line_error(run_dfs("ls", "/"))
    assert "secret" in err and "AUTH" in err
    short = tmp_path / "short"
    short.write_text("too short")
    err = one_line_error(run_dfs("--secret-file", str(short), "status"))
    assert "32 bytes" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_up(tmp_path: Path) -> None:
    """`dfs local up` starts a usable cluster and SIGTERM stops every child, exit status 0."""
    address = f"127.0.0.1:{free_port()}"
    env = {"DFS_COORDINATOR": address}
    up = Child("local-up", [*DFS, "local", "up", "--dir", str(tmp_path / "c"), "--nodes", "3"],
               tmp_path / "up.log", env=env)
    up.start()
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops" not in up.log.read_bytes():
            assert up.running(), up.log_tail()
            assert time.monotonic() < deadline, up.log_tail()
            time.sleep(0.1)
        secret = tmp_path / "c" / "secret"
        assert len(secret.read_text().strip()) == 64
        env["DFS_SECRET_FILE"] = str(secret)
        assert run_dfs("put", "-", "/f", input=b"local", env=env).returncode == 0
        assert run_dfs("cat", "/f", env=env).stdout == b"local"
        status = json.loads(run_dfs("status", "--json", env=env).stdout)
        assert [n["state"] for n in status["nodes"]] == ["up"] * 3
        pids = [int(p) for p in re.findall(r"pid (\d+)", up.log.read_text())]
        assert len(pids) == 4
    finally:
        assert up.stop(timeout=30) == 0, up.log_tail()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_up_starts_a_killed_node_again(tmp_path: Path) -> None:
    """kill -9 of one of `dfs local up`'s nodes does not take the cluster down: local up keeps
    running, starts the node again, and the node serves again (issue 17)."""
    env = {"DFS_COORDINATOR": f"127.0.0.1:{free_port()}"}
    with LocalUp(tmp_path, "--nodes", "2", "--replicas", "2", env=env) as up:
        old = up.pids()["node-1"]
        os.kill(old, signal.SIGKILL)
        up.wait_restarted("node-1", old)
        node_log = up.dir / "node-1.log"
        address = up.wait_until(lambda: (LISTENING.findall(node_log.read_bytes())[1:] or [b""])
                                [-1].decode(), 30, "the restarted node listening")

        def back() -> bool:
            nodes = (up.status() or {}).get("nodes", [])
            return {(n["address"], n["state"]) for n in nodes} >= {(address, "up")} and all(
                n["state"] == "up" for n in nodes)

        up.wait_until(back, 30, f"node-1 up again at {address}")
        ok(up.dfs("put", "-", "/after", input=b"both replicas"))  # R=2: node-1 took its copy
        assert ok(up.dfs("cat", "/after")) == b"both replicas"
        assert b"node-1 (pid %d) was killed by SIGKILL" % old in up.child.log.read_bytes()
        assert up.child.running()
        assert up.stop() == 0, up.log()
    assert up.leftovers() == []


def test_supervisor_restarts_at_a_bounded_rate() -> None:
    """A child that dies at once every time is started again after pauses that double (no
    spin); one not to be restarted is reported once and left stopped."""
    lines: list[tuple[float, str]] = []
    supervisor = Supervisor(lambda line: lines.append((time.monotonic(), line)))
    crashing = Child("crashing", [sys.executable, "-c", "raise SystemExit(3)"],
                     Path(os.devnull))
    once = Child("once", [sys.executable, "-c", "pass"], Path(os.devnull))
    for child in (crashing, once):
        child.start()
    supervisor.watch(crashing)
    supervisor.watch(once, restart=False, note=": see to it")
    deadline = time.monotonic() + 60
    while sum(line.startswith("crashing (pid") for _, line in lines) < 3:
        assert time.monotonic() < deadline, lines
        supervisor.check()
        time.sleep(0.01)
    crashing.stop()
    died = [(t, line) for t, line in lines if line.startswith("crashing") and "exited" in line]
    started = [t for t, line in lines if line.startswith("crashing started again")]
    pauses = [float(re.search(r"again in ([\d.]+) s", line)[1]) for _, line in died]
    assert pauses[:3] == [RESTART_MIN_S, 2 * RESTART_MIN_S, 4 * RESTART_MIN_S], lines
    for (died_at, _), pause, started_at in zip(died, pauses, started, strict=False):
        assert started_at - died_at >= pause, lines
    assert [line for _, line in lines if line.startswith("once")] == [
        f"once (pid {once.pid}) exited with status 0; not restarted: see to it "
        f"(log {os.devnull})"]


def test_address_options_are_one_line_usage_errors_before_anything_starts(
        tmp_path: Path) -> None:
    """Every HOST:PORT option goes through one parser: a list where one address is meant, a
    bad port, an empty host or garbage is one line naming the option (or DFS_COORDINATOR),
    exit status 2, and nothing has started (no data directory made; issue 17)."""
    made = tmp_path / "made"
    two = "127.0.0.1:7700,127.0.0.1:7701"
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["coordinator", "--data", str(made), "--listen", two], {}, "--listen"),
        (["coordinator", "--data", str(made), "--meta", "etcd://127.0.0.1:2379,:2380"], {},
         "--meta"),
        (["meta", "migrate", "--data", str(made), "--to", "etcd://127.0.0.1:2379,2380"], {},
         "--to"),
        (["node", "--data", str(made), "--listen", "garbage"], {}, "--listen"),
        (["node", "--data", str(made), "--advertise", "127.0.0.1:0"], {}, "--advertise"),
        (["--coordinator", "127.0.0.1:7700,", "ls", "/"], {}, "--coordinator"),
        (["ls", "/"], {"DFS_COORDINATOR": "127.0.0.1:7700,nohost:"}, "DFS_COORDINATOR"),
        (["local", "up", "--dir", str(made)], {"DFS_COORDINATOR": ":7700"}, "DFS_COORDINATOR"),
        (["local", "up", "--ha", "--dir", str(made), "--coordinator", "127.0.0.1:65535"], {},
         "--coordinator"),
    ]
    for args, env, named in cases:
        err = one_line_error(run_dfs(*args, env=env), 2)
        assert named in err, (args, env, err)
        assert not made.exists(), (args, env)


PEAK_RSS = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, result.returncode)
"""


def test_big_file_streams_in_bounded_memory(shared_cluster: Cluster, tmp_path: Path) -> None:
    """put and get of a file far bigger than the client's memory budget: peak RSS stays low."""
    size = 300 * MiB
    src = tmp_path / "big"
    with open(src, "wb") as f:
        f.seek(size - 1)
        f.write(b"!")

    def peak_kib(*args: str | Path) -> int:
        argv = [sys.executable, "-c", PEAK_RSS, *DFS, *map(str, args)]
        result = subprocess.run(argv, capture_output=True, env=shared_cluster.cli_env(),
                                timeout=300)
        rss, status = result.stdout.split()
        assert status == b"0", result.stderr.decode()
        return int(rss)

    assert peak_kib("put", src, "/big") < 150 * 1024
    dest = tmp_path / "back"
    assert peak_kib("get", "/big", dest) < 150 * 1024
    assert dest.stat().st_size == size
    with open(dest, "rb") as f:
        f.seek(size - 1)
        assert f.read() == b"!"
    shared_cluster.dfs("rm", "/big")


def test_retry_for_bounds_how_long_a_command_waits_for_an_unreachable_cluster(
        tmp_path: Path) -> None:
    """A command rides out an unreachable coordinator (a failover, a restart) for
    --retry-for seconds (env DFS_RETRY_FOR), then fails with one line: its last attempt is
    made when those seconds are up, not a backoff pause before (issue 17)."""
    retry_s = 3.5  # the pause a give-up before the deadline skips is then 1 s (BACKOFF_MAX)
    slack_s = 0.25  # from the command's first attempt being timed to its reaching us
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    # Nothing behind the proxy: it accepts each connection and hangs up, so the handshake
    # fails as at a dead port, and it notes when each attempt came: what the command tried,
    # seen from the other end (the command's own start-up is no part of it).
    with TcpProxy(f"127.0.0.1:{free_port()}") as cluster:
        env = {**os.environ, "DFS_COORDINATOR": cluster.endpoint, "DFS_SECRET_FILE": str(secret)}

        def ls(*args: str, **extra: str) -> tuple[subprocess.CompletedProcess[bytes], list[float]]:
            del cluster.accepted[:]
            result = subprocess.run([*DFS, *args, "ls", "/"], env={**env, **extra},
                                    capture_output=True, timeout=60)
            return result, list(cluster.accepted)

        quick, quick_attempts = ls("--retry-for", "0")
        patient, patient_attempts = ls(DFS_RETRY_FOR=str(retry_s))
    for result in (quick, patient):
        assert result.returncode == 1 and result.stderr.count(b"\n") == 1, result.stderr
        assert b"UNAVAILABLE" in result.stderr, result.stderr
    assert len(quick_attempts) == 1, quick_attempts
    span_s = patient_attempts[-1] - patient_attempts[0]
    assert retry_s - slack_s <= span_s < retry_s + 2.0, (span_s, patient_attempts)
    bad = subprocess.run([*DFS, "--retry-for", "soon", "ls", "/"], env=env,
                         capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"--retry-for" in bad.stderr
