"""Running dfs in production (docs/operations.md): JSON logs, systemd readiness, `dfs local up`
children that never outlive it, and the mount(8) helper's option translation."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import Cluster
from local_up import alive

from dfs import logs
from dfs.cli.mount_helper import HelperUsage, translate
from dfs.cli.procs import DFS, Child

WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = WAIT) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def json_lines(path: Path) -> list[dict]:
    """The log's JSON records; every line that looks like one must parse as one object."""
    records = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


# ---------------------------------------------------------------- systemd readiness, JSON logs


class NotifySocket:
    """What systemd binds for a Type=notify service: a datagram socket in a tmp dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(WAIT)

    def receive(self) -> dict[str, str]:
        message = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.splitlines())

    def close(self) -> None:
        self.sock.close()


def test_servers_tell_systemd_when_they_serve_and_log_json(tmp_path: Path) -> None:
    """Under NOTIFY_SOCKET the coordinator and a node send READY=1 (with their pid) once they
    listen, and with --log-format json every stderr log line is one JSON object with time,
    level, process and message, the node's lines also its id once it has registered."""
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    address = f"127.0.0.1:{free_port()}"
    notify = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "DFS_LOG_LEVEL": "INFO"}
    common = [*DFS, "--secret-file", str(secret), "--coordinator", address, "--log-format", "json"]
    coordinator = Child("coordinator", [*common, "coordinator", "--data", str(tmp_path / "c"),
                                        "--listen", address, "--replicas", "1"],
                        tmp_path / "coordinator.log", env=env)
    node = Child("node", [*common, "node", "--data", str(tmp_path / "n"), "--listen",
                          "127.0.0.1:0", "--heartbeat-interval", "0.2"],
                 tmp_path / "node.log", env=env)
    try:
        coordinator.start()
        ready = notify.receive()
        assert ready["READY"] == "1" and int(ready["MAINPID"]) == coordinator.pid
        assert address in ready["STATUS"]
        node.start()
        ready = notify.receive()
        assert ready["READY"] == "1" and int(ready["MAINPID"]) == node.pid
        wait_for(lambda: any("registered as node" in r["message"]
                             for r in json_lines(node.log)), "the node to register")
    finally:
        node.stop()
        coordinator.stop()
        notify.close()
    for child, process in ((coordinator, "coordinator"), (node, "node")):
        records = json_lines(child.log)
        assert records, child.log_tail()
        for r in records:
            assert {"time", "level", "process", "pid", "logger", "message"} <= r.keys()
            assert r["process"] == process and r["pid"] == child.pid
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"])
        # Apart from the ready line, nothing on stderr/stdout is a human-format log line.
        others = [line for line in child.log.read_text().splitlines()
                  if not line.startswith("{") and "listening on" not in line]
        assert others == [], others
    registered = [r for r in json_lines(node.log) if "registered as node" in r["message"]]
    assert registered[0]["node"] == 1
    assert all("node" not in r for r in json_lines(coordinator.log))


def test_json_records_carry_the_txid_a_call_site_gives() -> None:
    """`extra={"txid": N}` becomes the record's txid; the message is formatted; a traceback
    stays inside the one line."""
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("dfs.coordinator.commit", logging.WARNING, __file__, 1,
                               "transaction %d aborted", (42,), None)
    record.txid = 42
    doc = json.loads(formatter.format(record))
    assert doc["txid"] == 42 and doc["message"] == "transaction 42 aborted"
    assert doc["level"] == "WARNING"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_default_logs_stay_human_readable(tmp_path: Path) -> None:
    """Without --log-format the log lines are today's text lines, not JSON."""
    cluster = Cluster(tmp_path, nodes=1, replicas=1).start()
    try:
        text = cluster.procs["coordinator"].log.read_text()
    finally:
        cluster.stop_all()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO dfs\.coordinator", text, re.M)
    assert not any(line.startswith("{") for line in text.splitlines())


# ---------------------------------------------------------------- dfs local up


def test_local_up_children_die_with_it_even_on_sigkill(tmp_path: Path) -> None:
    """kill -9 of `dfs local up` leaves no coordinator or node behind; --log-format json
    reaches the children; under systemd the cluster, not each child, reports READY=1."""
    address = f"127.0.0.1:{free_port()}"
    notify = NotifySocket(tmp_path / "notify")
    up = Child("local-up", [*DFS, "--coordinator", address, "--log-format", "json", "local", "up",
                            "--dir", str(tmp_path / "c"), "--nodes", "2", "--replicas", "2"],
               tmp_path / "up.log",
               env={"DFS_LOG_LEVEL": "INFO", "NOTIFY_SOCKET": str(notify.path)})
    up.start()
    pids: list[int] = []
    try:
        # The cluster says ready once, when all of it is up; the children say nothing.
        ready = notify.receive()
        assert int(ready["MAINPID"]) == up.pid, ready
        assert b"Ctrl-C stops" in up.log.read_bytes(), up.log_tail()
        pids = [int(p) for p in re.findall(r"pid (\d+)", up.log.read_text())]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        assert up.kill(signal.SIGKILL) == -signal.SIGKILL
        wait_for(lambda: not any(alive(p) for p in pids), "the children to exit", 15)
    finally:
        notify.close()
        up.stop()
        for pid in pids:  # only if the test failed: never leave them running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    for name in ("coordinator", "node-1", "node-2"):
        records = json_lines(tmp_path / "c" / f"{name}.log")
        assert records and all(r["process"] == name.split("-")[0] for r in records)


# ---------------------------------------------------------------- mount.dfs options


def test_mount_helper_translates_mount_options() -> None:
    argv = translate("10.0.0.1:7700,10.0.0.2:7700", "/mnt/dfs",
                     "secret_file=/etc/dfs/s,ro,_netdev,defaults,noauto,nofail,rw,"
                     "x-systemd.automount,cache_size=2G,attr-timeout=3,page_cache,log_format=json")
    assert argv == ["--coordinator", "10.0.0.1:7700,10.0.0.2:7700", "--secret-file", "/etc/dfs/s",
                    "mount", "/mnt/dfs", "--read-only", "--cache-size", "2G",
                    "--attr-timeout", "3", "--page-cache", "--log-format", "json"]
    with pytest.raises(HelperUsage, match="unknown option frobnicate"):
        translate("h:1", "/mnt", "frobnicate")
    assert "frobnicate" not in translate("h:1", "/mnt", "frobnicate", sloppy=True)
    with pytest.raises(HelperUsage, match="needs a value|needs value"):
        translate("h:1", "/mnt", "cache_dir")
    # -o on_conflict=fail is `dfs mount --on-conflict fail` (docs/mount.md, "Conflicting writers")
    assert translate("h:1", "/mnt", "on_conflict=fail")[-2:] == ["--on-conflict", "fail"]
    assert translate("h:1", "/mnt", "on-conflict=overwrite")[-2:] == ["--on-conflict",
                                                                       "overwrite"]
    with pytest.raises(HelperUsage, match="takes no value"):
        translate("h:1", "/mnt", "page_cache=1")


def test_mount_helper_usage_errors_are_one_line_status_1(tmp_path: Path) -> None:
    helper = [sys.executable, "-m", "dfs.cli.mount_helper"]
    result = subprocess.run([*helper, "h:1", str(tmp_path), "-o", "bogus"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr == "mount.dfs: unknown option bogus\n"
    result = subprocess.run([*helper, "h:1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    fake = subprocess.run([*helper, "h:1", str(tmp_path), "-fv", "-o", "secret_file=/s,ro"],
                          capture_output=True, text=True, timeout=60)
    assert fake.returncode == 0
    assert f"--secret-file /s mount {tmp_path} --read-only" in fake.stderr
