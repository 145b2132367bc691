"""Real etcd members on loopback for tests: one member, or a cluster of three.

Each member is the Debian `etcd` binary started in its own session with its data dir under
the test's tmp dir and client/peer ports picked by binding port 0 (then freed and passed on);
it is stopped by its pid alone (SIGTERM, then SIGKILL). Compaction and the backend quota are
set as a deployment would set them, so tests see etcd as it is run, not its bare defaults.

Without an etcd binary the tests skip, unless DFS_REQUIRE_FUSE=1 (CI, where scripts/install
puts etcd-server in) turns the skip into a failure.

    with EtcdCluster(tmp_path, members=3) as etcd:
        client = etcd.client()
        etcd.kill(0); etcd.restart(0)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dfs.cli import etcd_members
from dfs.cli.etcd_members import free_port
from dfs.etcd.client import EtcdClient, EtcdError

START_TIMEOUT = 20.0
PORT_ATTEMPTS = 5  # first starts redone on fresh ports when a picked one was taken meanwhile
STOP_TIMEOUT = 5.0
QUOTA_BYTES = 256 * 1024 * 1024


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def require_etcd() -> str:
    path = etcd_binary()
    if path is None:
        why = "etcd is not installed (scripts/install puts Debian's etcd-server in)"
        if os.environ.get("DFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"DFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    return path


class Member(etcd_members.Member):
    """A member of a test cluster: ports from the OS, its data dir, log and process."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(name, free_port(), free_port())
        self.data_dir = root / f"{name}.data"
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None


class EtcdCluster:
    """`members` etcd processes forming one cluster."""

    def __init__(self, root: Path, *, members: int = 1, compaction_retention: str = "1000",
                 quota_bytes: int = QUOTA_BYTES, tls: etcd_members.MemberTls | None = None
                 ) -> None:
        """`tls`: every member serves its client and peer links over TLS with these files,
        requiring a client certificate of the same CA (clients: `client()` presents one)."""
        self.tls = tls
        self.binary = require_etcd()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.members = [Member(self.root, f"etcd-{i}") for i in range(members)]
        self.compaction_retention = compaction_retention
        self.quota_bytes = quota_bytes
        self._started_once: set[int] = set()

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def client(self, *, timeout: float = 2.0, endpoints: list[str] | None = None
               ) -> EtcdClient:
        return EtcdClient(endpoints or self.endpoints, timeout=timeout,
                          tls=self.tls.context() if self.tls is not None else None)

    def _command(self, i: int) -> list[str]:
        m = self.members[i]
        return etcd_members.member_command(
            self.binary, m, self.members, m.data_dir, token=f"dfs-test-{os.getpid()}",
            retention=self.compaction_retention, quota=self.quota_bytes, tls=self.tls)

    def start(self) -> EtcdCluster:
        """Start every member. etcd needs its ports on the command line, so they are picked
        by binding port 0 and passed on: another process may take one in between (two test
        workers start servers at once). A first start that loses a port that way is redone
        on fresh ports, from empty data dirs (nothing was ever stored)."""
        for attempt in range(PORT_ATTEMPTS):
            for i in range(len(self.members)):
                self.spawn(i)
            try:
                for i in range(len(self.members)):
                    self.wait_ready(i)
                return self
            except RuntimeError as e:
                self.stop_all()  # a failed start leaves no member behind
                if "address already in use" not in str(e) or attempt == PORT_ATTEMPTS - 1:
                    raise
            for i, m in enumerate(self.members):
                shutil.rmtree(m.data_dir, ignore_errors=True)
                self.members[i] = Member(self.root, m.name)
        return self

    def spawn(self, i: int) -> None:
        m = self.members[i]
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen(self._command(i), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self._started_once.add(i)

    def wait_ready(self, i: int) -> None:
        """Until member i answers a linearizable read (it has joined a cluster with a leader)."""
        m = self.members[i]
        deadline = time.monotonic() + START_TIMEOUT
        with self.client(timeout=1.0, endpoints=[m.endpoint]) as client:
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"{m.name} exited with {m.proc.returncode}: "
                                       f"{m.log.read_text()[-2000:]}")
                try:
                    client.range(b"ready-check")
                    return
                except EtcdError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{m.name} not ready after {START_TIMEOUT} s: "
                                           f"{m.log.read_text()[-2000:]}") from None
                    time.sleep(0.05)

    def leader_index(self) -> int:
        """Which member is etcd's raft leader now (as the members that answer agree)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for i, m in enumerate(self.members):
                if m.proc is None or m.proc.poll() is not None:
                    continue
                try:
                    with self.client(timeout=1.0, endpoints=[m.endpoint]) as client:
                        st = client.status(m.endpoint)
                except EtcdError:
                    continue
                if st.leader and st.leader == st.member_id:
                    return i
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader after {START_TIMEOUT} s")
            time.sleep(0.05)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop member i at once (kill -9 by default) by its pid."""
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(timeout=STOP_TIMEOUT)

    def pause(self, i: int) -> None:
        proc = self.members[i].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.members[i].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGCONT)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Start member i again on its data dir (it rejoins the cluster)."""
        self.stop(i)
        self.spawn(i)
        if wait:
            self.wait_ready(i)

    def stop(self, i: int) -> None:
        """SIGTERM, then SIGKILL if it does not go in time."""
        proc = self.members[i].proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for i in range(len(self.members)):
            self.stop(i)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@contextmanager
def etcd_single(root: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(root, members=1) as cluster:
        yield cluster


@contextmanager
def etcd_three(root: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(root, members=3) as cluster:
        yield cluster


class TcpProxy:
    """A loopback TCP proxy in front of one endpoint, for network faults between a client
    and etcd. `mode`:
    - "pass": both ways as they come;
    - "drop": requests reach etcd, replies are thrown away (a reply lost on the way back);
    - "hold": requests are kept back until `release()` (a request that arrives late, after
      its sender gave up on it; the connection to etcd stays open, so it is served then);
    - "drop-txn": as "drop", for the replies to KV txns only (the JSON gateway's HTTP/1.1
      requests one at a time per connection): a leader's writes land unanswered while its
      lease keepalives go on.
    Threads with blocking sockets: usable from sync code and from trio tests alike.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.mode = "pass"
        self._lock = threading.Lock()
        self._held: list[tuple[socket.socket, bytes]] = []
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[float] = []  # time.monotonic() of each connection accepted
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def release(self) -> None:
        """Send everything held back, in order, on the connections it came in on."""
        with self._lock:
            held, self._held = self._held, []
        for upstream, data in held:
            with contextlib.suppress(OSError):
                upstream.sendall(data)

    def stop(self) -> None:
        self._stopped.set()
        for t in self._threads:
            t.join(timeout=2)
        with self._lock:
            for s in self._sockets:
                s.close()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(time.monotonic())
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # nothing behind: accept, then close (a dead member)
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(0.1)
            with self._lock:
                self._sockets += [client, upstream]
            last_request: list[bytes] = [b""]  # this connection's latest request line
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, way, last_request),
                                     daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str,
              last_request: list[bytes]) -> None:
        while not self._stopped.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return  # (an upstream connection stays open: held data may follow)
            if way == "up" and self.mode == "hold":
                with self._lock:
                    self._held.append((dst, data))
                continue
            if way == "up" and data[:5] == b"POST ":
                last_request[0] = data.split(b"\r\n", 1)[0]
            if way == "down" and (self.mode == "drop" or (
                    self.mode == "drop-txn" and b" /v3/kv/txn " in last_request[0])):
                continue
            with contextlib.suppress(OSError):
                dst.sendall(data)
