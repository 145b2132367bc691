"""A real cluster on loopback for tests: a coordinator and N storage nodes as `dfs` processes.

Everything lives in one tmp dir (data dirs, logs, the secret). Timeouts are short so failure
tests run in seconds. Every process is started in its own session and stopped by its pid alone,
never by name. The harness is synchronous, so it works from plain and from trio tests alike;
`client()` gives a library Client for async tests, `dfs(...)` runs the real command line.

    c = Cluster(tmp_path).start()
    c.kill("node-2"); c.restart("node-2", env={"DFS_FAILPOINTS": "node.before_vote=crash"})
    c.dfs("put", "-", "/f", input=b"data")
    async with c.client() as client: ...
    c.stop_all()
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lmdb
import trio

from dfs.cli.procs import DFS, Child
from dfs.client import Client
from dfs.errors import DfsError
from dfs.rpc import load_secret

COORDINATOR = "coordinator"
COORDINATOR_ARGS = ("--node-timeout", "1.5", "--gc-grace", "1", "--vote-timeout", "2",
                    "--txn-timeout", "10")
NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "1")
START_TIMEOUT = 30.0
# s the harness's own status queries retry an unreachable coordinator, as `dfs status` does.
STATUS_RETRY_FOR = 5.0


def run_trio(fn: Callable[[], Awaitable[Any]]) -> Any:
    """trio.run(fn) in a thread of its own, so plain and trio tests alike may call the harness
    (a trio test cannot start a second event loop in its own thread)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = trio.run(fn)
        except BaseException as error:  # re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, name="cluster-harness")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Cluster:
    def __init__(
        self,
        root: Path,
        *,
        nodes: int = 3,
        replicas: int = 3,
        coordinator_args: Sequence[str] = COORDINATOR_ARGS,
        node_args: Sequence[str] = NODE_ARGS,
        env: Mapping[str, Mapping[str, str]] | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.replicas = replicas
        self.coordinator_args = list(coordinator_args)
        self.node_args = list(node_args)
        self.env = {name: dict(e) for name, e in (env or {}).items()}
        # Per-process arguments after the common ones, e.g. {"node-3": ["--capacity", "65536"]}.
        self.extra_args = {name: list(a) for name, a in (extra_args or {}).items()}
        self.secret_file = self.root / "secret"
        if not self.secret_file.exists():
            self.secret_file.write_text(os.urandom(32).hex() + "\n")
        self.secret = load_secret(self.secret_file)
        self.procs: dict[str, Child] = {}
        self.coordinator = ""  # HOST:PORT once started
        # Standby coordinators (HOST:PORT) nodes are also given: `--coordinator A,S1,S2`.
        self.standbys: list[str] = []

    # ------------------------------------------------------------ processes

    @property
    def node_names(self) -> list[str]:
        return [n for n in self.procs if n != COORDINATOR]

    def _argv(self, name: str, listen: str) -> list[str]:
        common = ["--secret-file", str(self.secret_file)]
        if name == COORDINATOR:
            return [*DFS, *common, "coordinator", "--data", str(self.data_dir(name)),
                    "--listen", listen, "--replicas", str(self.replicas),
                    *self.coordinator_args, *self.extra_args.get(name, ())]
        return [*DFS, *common, "--coordinator", self.coordinators, "node",
                "--data", str(self.data_dir(name)), "--listen", listen, *self.node_args,
                *self.extra_args.get(name, ())]

    @property
    def coordinators(self) -> str:
        """The coordinator list nodes are started with: the coordinator, then the standbys."""
        return ",".join([self.coordinator, *self.standbys])

    def _spawn(self, name: str, listen: str, env: Mapping[str, str] | None) -> str:
        if env is not None:
            self.env[name] = dict(env)
        child = self.procs.get(name)
        if child is None:
            child = self.procs[name] = Child(name, [], self.root / f"{name}.log")
        child.argv = self._argv(name, listen)
        child.start({"DFS_LOG_LEVEL": "INFO", **self.env.get(name, {})})
        return child.wait_listening(START_TIMEOUT)

    def start(self) -> Cluster:
        """Start the coordinator, then the nodes one by one (node-i registers i-th, so its
        id is i: tests count on it); return once every node is up."""
        self.coordinator = self._spawn(COORDINATOR, "127.0.0.1:0", None)
        for i in range(1, self.nodes + 1):
            self.add_node(f"node-{i}", wait=False)
        self.wait_nodes_up()
        return self

    def add_node(self, name: str | None = None, env: Mapping[str, str] | None = None,
                 *, wait: bool = True) -> str:
        """Start one more node (a new data dir); its name."""
        name = name or f"node-{len(self.node_names) + 1}"
        self._spawn(name, "127.0.0.1:0", env)
        if wait:
            self.wait_nodes_up()
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal by pid (SIGKILL waits for the exit; SIGSTOP/SIGCONT pause/resume)."""
        self.procs[name].kill(sig)

    def stop(self, name: str) -> int | None:
        return self.procs[name].stop()

    def restart(self, name: str, env: Mapping[str, str] | None = None, *,
                wait: bool = True, args: Sequence[str] | None = None,
                listen: str | None = None) -> None:
        """Start `name` again on the same address and data dir (stopping it first if running);
        listen="127.0.0.1:0" moves it to a new address (a new leader on the same metadata).

        env replaces that process's extra environment (e.g. DFS_FAILPOINTS); None keeps it.
        args likewise replaces its extra command-line arguments (e.g. ["--capacity", "65536"]).
        """
        if args is not None:
            self.extra_args[name] = list(args)
        child = self.procs[name]
        if child.running():
            child.stop()
        listen = listen or child.address or "127.0.0.1:0"
        address = self._spawn(name, listen, env)
        if name == COORDINATOR:
            self.coordinator = address
        if wait:
            self.wait_nodes_up()

    def stop_all(self) -> None:
        """Stop every process (the nodes, all at once, then the coordinator), each by its own
        pid."""
        nodes = [self.procs[name] for name in self.node_names]
        for child in nodes:
            child.kill(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            child.send_signal(signal.SIGTERM)
        for child in nodes:
            if child.proc is not None:
                try:
                    child.proc.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill(signal.SIGKILL)
        coordinator = self.procs.get(COORDINATOR)
        if coordinator is not None:
            coordinator.kill(signal.SIGCONT)
            coordinator.stop(timeout=5)

    def running(self, name: str) -> bool:
        return self.procs[name].running()

    def log(self, name: str, lines: int = 40) -> str:
        return self.procs[name].log_tail(lines)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {n}\n{self.log(n, lines)}" for n in self.procs)

    # ------------------------------------------------------------ paths and ids

    def data_dir(self, name: str) -> Path:
        return self.root / name

    def node_store_path(self, name: str) -> Path:
        """The node's data dir: its LMDB environment is data.mdb inside (docs/design.md §11)."""
        return self.data_dir(name)

    def corrupt_chunk(self, name: str, blob: int, index: int = 0, offset: int = 0) -> None:
        """Flip one byte of a stored chunk, as bit rot would (stop the node first).

        Uses the documented layout (docs/design.md §3): `chunks` key = blob u64 BE + index u32 BE,
        value = the chunk's 8-byte digest, then its bytes.
        """
        assert not self.running(name), "stop the node before editing its store"
        # Map well past the file: with lmdb's default 10 MiB map, a store bigger than that has
        # no free page for the copy-on-write put (MDB_MAP_FULL; found by the nemesis).
        path = self.node_store_path(name)
        map_size = 2 * (path / "data.mdb").stat().st_size + 2**26
        env = lmdb.open(str(path), max_dbs=8, subdir=True, map_size=map_size)
        try:
            db = env.open_db(b"chunks")
            with env.begin(write=True, db=db) as txn:
                key = struct.pack(">QI", blob, index)
                value = bytearray(txn.get(key))
                value[8 + offset] ^= 0xFF
                txn.put(key, bytes(value))
        finally:
            env.close()

    def node_id(self, name: str) -> int:
        """A node's id, found in the node table by the address it listens on."""
        address = self.procs[name].address
        for node in self.status()["nodes"]:
            if node["address"] == address:
                return int(node["id"])
        raise KeyError(f"{name} ({address}) is not in the node table")

    def node_name(self, node_id: int) -> str:
        by_address = {c.address: n for n, c in self.procs.items()}
        for node in self.status()["nodes"]:
            if node["id"] == node_id:
                return by_address[node["address"]]
        raise KeyError(node_id)

    # ------------------------------------------------------------ the command line

    def cli_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "DFS_COORDINATOR": self.coordinator,
                "DFS_SECRET_FILE": str(self.secret_file), **(extra or {})}

    def dfs(self, *args: str | os.PathLike[str], input: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the real `dfs` command against this cluster; never raises on failure."""
        return subprocess.run(
            [*DFS, *map(str, args)], input=input, capture_output=True,
            env=self.cli_env(env), timeout=timeout, cwd=cwd,
        )

    def dfs_json(self, *args: str) -> Any:
        result = self.dfs(*args, "--json")
        if result.returncode != 0:
            raise AssertionError(f"dfs {' '.join(args)}: {result.stderr.decode()}")
        return json.loads(result.stdout)

    def status(self, retry_for: float = STATUS_RETRY_FOR) -> dict[str, Any]:
        """The document `dfs status --json` prints, asked in-process: the harness polls it
        often, and each `dfs` run costs ~0.6 s of interpreter start. Tests of the command
        itself run `dfs status`. A cluster whose commands use TLS (set up per process by
        the CLI, not here) is asked through the command."""
        if self._cli_uses_tls():
            return self.dfs_json("status")

        async def ask() -> dict[str, Any]:
            from dfs.cli.admin import coordinator_roles

            async with Client(self.coordinator, self.secret, retry_for=retry_for) as client:
                doc = await client.status()
                doc["coordinators"] = await coordinator_roles(client)
                return doc

        return json.loads(json.dumps(run_trio(ask)))  # the types the command's JSON has

    def _cli_uses_tls(self) -> bool:
        env = self.cli_env()
        return any(env.get(f"DFS_TLS_{part}") for part in ("CERT", "KEY", "CA"))

    def wait_nodes_up(self, count: int | None = None, timeout: float = START_TIMEOUT) -> None:
        want = len(self.node_names) if count is None else count

        def enough_up() -> bool:
            try:
                nodes = self.status()["nodes"]
            except (DfsError, OSError, AssertionError):
                return False  # the coordinator is not answering (yet): look again
            return sum(n["state"] == "up" for n in nodes) >= want

        self.wait_until(enough_up, timeout, message=f"{want} nodes up")

    # ------------------------------------------------------------ waiting, clients

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0,
                   interval: float = 0.05, message: str = "") -> Any:
        """Poll a plain predicate until truthy (its value is returned) or fail the test."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for "
                                     f"{message or predicate}\n{self.logs(10)}")
            time.sleep(interval)

    async def await_until(self, predicate: Callable[[], Awaitable[Any] | Any],
                          timeout: float = 10.0, interval: float = 0.05,
                          message: str = "") -> Any:
        """wait_until for trio tests: the predicate may be async; the event loop stays free."""
        with trio.move_on_after(timeout):
            while True:
                value = predicate()
                if isinstance(value, Awaitable):
                    value = await value
                if value:
                    return value
                await trio.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")

    def client(self, **options: Any) -> Client:
        """A library client of this cluster (`async with cluster.client() as c`)."""
        options.setdefault("retry_for", 10.0)
        return Client(self.coordinator, self.secret, **options)
