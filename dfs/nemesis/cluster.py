"""The nemesis's cluster: real `dfs` processes on loopback, every link behind a proxy.

Topology (each arrow is a `Proxy`, so the nemesis can cut or slow it):

    clients   --c-clients-->  coordinator        node-i --c-node-i--> coordinator
    mount     --c-mount---->  coordinator        anyone --n-i-------> node-i
    mount-r   --c-mount-r-->  coordinator

A node advertises its `n-i` proxy, so the coordinator, clients and the mount all reach it
through that one link; cutting `n-i` and `c-node-i` isolates node-i completely. Addresses that
processes know stay fixed across restarts (they are the proxies'); a process that comes back on
another real port only needs its proxy retargeted.

With `ha` (issue 10), the metadata is in three etcd members (dfs/cli/etcd_members.py, under
the campaign root) and two coordinators run with `--meta`; each has its own set of links, so
a partition or a kill means one coordinator, not "the" coordinator:

    clients --c1-clients--> coordinator-1 --e1-etcd-j--> etcd-j   (j = 1..3)
            --c2-clients--> coordinator-2 --e2-etcd-j--> etcd-j

and so on for the mount and each node (`c1-node-i`, `c2-node-i`). Clients, the mount and the
nodes are given both of their proxies (`--coordinator c1,c2`) and follow the leader. A standby
names the leader by its real address; the c-proxies rewrite that NOT_LEADER reply into the
address of the same link to the leader (proxy.py), so nobody ever bypasses a proxy. Cutting
`e<k>-*` is "coordinator k cut off from etcd while it still reaches the nodes".

Unlike tests/cluster.py (a synchronous pytest helper), this one is driven from trio while a
workload runs: the blocking parts (spawning, waiting for the ready line, LMDB surgery) run in
worker threads. Every process is started in its own session and stopped by its pid alone.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import trio

from dfs.cli.etcd_members import LocalEtcd
from dfs.cli.procs import DFS, Child
from dfs.client import Client
from dfs.nemesis.ha_cluster import (
    COORDINATOR,
    HA_COORDINATORS,
    LEADER_TTL,
    START_TIMEOUT,
    HaMembers,
)
from dfs.nemesis.proxy import Proxies
from dfs.rpc import load_secret

MOUNT = "mount"  # the writers' mount: the nemesis pauses, kills and stops it
READER_MOUNT = "mount-r"  # the readers' mount of the mount load (mount_load.py): another host
MOUNT_STOP_TIMEOUT = 3.0  # the mounts' --stop-timeout: how long SIGTERM serves on for writers
COORDINATOR_ARGS = ("--node-timeout", "1.5", "--vote-timeout", "2", "--txn-timeout", "10")
NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "0.5", "--staged-timeout", "8")
GC_GRACE = 2.0  # seconds: superseded blobs are purged mid-campaign
TXN_RETENTION = 3.0  # seconds: ENDED transaction records are purged mid-campaign
MAX_NODES = 24  # node processes ever started (fresh ones replace removed ones)
MOUNT_READY = b"dfs mount ready at"


@dataclass
class Mount:
    """One FUSE mount of the cluster: its name (also its coordinator link's), where, and its
    process once started."""

    name: str
    path: Path
    child: Child | None = None
    ready: bool = False  # set once a start answers; cleared as a kill or stop begins


@dataclass
class Proc:
    """One server process and what it is restarted with."""

    name: str
    child: Child
    env: dict[str, str] = field(default_factory=dict)
    capacity: int | None = None
    paused: bool = False
    listen: str = "127.0.0.1:0"


class NemesisCluster(HaMembers):
    """A coordinator (or, with `ha`, two over three etcd members), `nodes` storage nodes
    (R=`replicas`), a FUSE mount and, with `reader_mount`, a second one."""

    def __init__(self, root: Path, proxies: Proxies, *, nodes: int = 4, replicas: int = 3,
                 mount: bool = True, gc_grace: float = GC_GRACE,
                 txn_retention: float = TXN_RETENTION, ha: bool = False,
                 reader_mount: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.proxies = proxies
        self.nodes = [f"node-{i}" for i in range(1, nodes + 1)]  # current members
        self.removed: list[str] = []  # removed by the nemesis, data directory deleted
        self.draining: set[str] = set()
        self.started_nodes = nodes
        self.gc_grace = gc_grace
        self.txn_retention = txn_retention
        self.replicas = replicas
        self.want_mount = mount
        self.secret_file = self.root / "secret"
        if not self.secret_file.exists():
            self.secret_file.write_text(os.urandom(32).hex() + "\n")
        self.secret = load_secret(self.secret_file)
        self.procs: dict[str, Proc] = {}
        self.mounts = {MOUNT: Mount(MOUNT, self.root / "mnt")}
        if mount and reader_mount:
            self.mounts[READER_MOUNT] = Mount(READER_MOUNT, self.root / "mnt-r")
        self.ha = ha
        self.coordinators = list(HA_COORDINATORS if ha else (COORDINATOR,))
        self.real: dict[str, str] = {}  # coordinator -> its real address
        self.etcd: LocalEtcd | None = None
        self.etcd_members: list[str] = []  # "etcd-1", ... (processes in self.procs)
        self.notes: Counter[str] = Counter()  # what the cluster itself worked around
        self.start_errors: list[str] = []

    @property
    def coordinator(self) -> str:
        """The real addresses, "A,B" (admin tools only; processes use proxies)."""
        return ",".join(self.real[c] for c in self.coordinators if c in self.real)

    # ------------------------------------------------------------ links

    def link(self, coordinator: str, who: str) -> str:
        """The proxy `who` ("clients", "mount", a node) reaches `coordinator` through."""
        if not self.ha:
            return f"c-{who}"
        return f"c{self.coordinators.index(coordinator) + 1}-{who}"

    def links_of(self, coordinator: str) -> list[str]:
        """Every link into `coordinator` (clients', the mount's and the nodes' heartbeats)."""
        prefix = self.link(coordinator, "")
        return [p for p in self.proxies.by_name if p.startswith(prefix)]

    def etcd_links(self, coordinator: str) -> list[str]:
        k = self.coordinators.index(coordinator) + 1
        return [f"e{k}-{m}" for m in self.etcd_members]

    def coordinator_list(self, who: str) -> str:
        """What `who` is given as --coordinator: its proxy to each coordinator."""
        return ",".join(self.proxies[self.link(c, who)].address for c in self.coordinators)

    async def add_links(self, who: str) -> None:
        for c in self.coordinators:
            await self.proxies.add(self.link(c, who), self.real.get(c, "127.0.0.1:1"),
                                   rewrite=partial(self._translate, who) if self.ha else None,
                                   secret=self.secret)

    # ------------------------------------------------------------ start-up

    async def start(self) -> None:
        if self.ha:
            await self.etcd_start()
        for coordinator in self.coordinators:
            await self.start_proc(coordinator)
            if self.ha and coordinator == self.coordinators[0]:
                await self.wait_leader(coordinator)  # the first one leads, as in tests
        for who in ("clients", *self.mounts, *self.nodes):
            await self.add_links(who)
        for node in self.nodes:
            await self.proxies.add(f"n-{node}", "127.0.0.1:1")  # retargeted once it listens
            await self.start_proc(node)
        await self.wait_nodes_up(len(self.nodes))
        if self.want_mount:
            for name in self.mounts:
                await self.mount_start(name)

    def _argv(self, name: str, proc: Proc) -> list[str]:
        common = [*DFS, "--secret-file", str(self.secret_file)]
        data = str(self.root / name)
        if name in self.coordinators:
            meta: list[str] = []
            if self.ha:
                endpoints = ",".join(self.proxies[e].address for e in self.etcd_links(name))
                meta = ["--meta", f"etcd://{endpoints}", "--leader-ttl", str(LEADER_TTL)]
            return [*common, "coordinator", "--data", data, "--listen", proc.listen,
                    "--replicas", str(self.replicas), *meta, *COORDINATOR_ARGS,
                    "--gc-grace", str(self.gc_grace), "--txn-retention", str(self.txn_retention)]
        argv = [*common, "--coordinator", self.coordinator_list(name), "node",
                "--data", data, "--listen", proc.listen,
                "--advertise", self.proxies[f"n-{name}"].address, *NODE_ARGS]
        if proc.capacity is not None:
            argv += ["--capacity", str(proc.capacity)]
        return argv

    async def start_proc(self, name: str, *, env: dict[str, str] | None = None,
                         capacity: int | None = None) -> None:
        """(Re)start a server with `env` (e.g. DFS_FAILPOINTS) and, for a node, `capacity`.

        It listens on its previous real port if it had one (falling back to a fresh port if
        that one is taken) and its proxies are pointed at wherever it listens now.
        """
        if name in self.etcd_members:
            await self.etcd_restart(name)
            return
        proc = self.procs.get(name)
        if proc is None:
            proc = self.procs[name] = Proc(name, Child(name, [], self.root / f"{name}.log"))
        assert not proc.child.running(), f"{name} is running"
        proc.env, proc.capacity, proc.paused = dict(env or {}), capacity, False
        candidates = list(dict.fromkeys([proc.listen, "127.0.0.1:0"]))
        supervised = self.ha and name in self.coordinators
        retry_until = trio.current_time() + START_TIMEOUT
        while True:
            proc.listen = candidates[0]
            proc.child.argv = self._argv(name, proc)
            proc.child.start({"DFS_LOG_LEVEL": "INFO", **proc.env})
            try:
                address = await trio.to_thread.run_sync(proc.child.wait_listening, START_TIMEOUT)
                break
            except Exception as e:
                if proc.child.running():
                    await self.kill(name)
                in_use = "in use" in proc.child.log_tail(5).lower()
                if len(candidates) > 1 and (in_use or not supervised):
                    candidates.pop(0)  # its old port is taken: a fresh one
                    continue
                # An HA coordinator that cannot start (etcd unreachable at start is a clear
                # error, by design) is started again, as a supervisor would; counted.
                if not supervised or trio.current_time() > retry_until:
                    raise
                self.notes[f"{name} failed to start, started again"] += 1
                self.start_errors.append(str(e)[-300:])
                await trio.sleep(0.5)
        proc.listen = address
        if name in self.coordinators:
            self.real[name] = address
            for link in self.links_of(name):
                self.proxies[link].retarget(address)
        else:
            self.proxies[f"n-{name}"].retarget(address)

    # ------------------------------------------------------------ membership

    @property
    def all_nodes(self) -> list[str]:
        return [*self.nodes, *self.removed]

    def can_add_node(self) -> bool:
        return self.started_nodes < MAX_NODES

    async def add_node(self) -> str:
        """Start a fresh node (new name, new data directory, new proxies); it registers
        itself with the coordinator when it can reach it."""
        self.started_nodes += 1
        name = f"node-{self.started_nodes}"
        await self.add_links(name)
        await self.proxies.add(f"n-{name}", "127.0.0.1:1")
        await self.start_proc(name)
        self.nodes.append(name)
        return name

    async def forget_node(self, name: str) -> None:
        """A removed node is gone for good: killed, its data directory deleted, its links
        refusing."""
        if self.running(name):
            await self.kill(name)
        await trio.to_thread.run_sync(shutil.rmtree, self.root / name, True)
        self.nodes.remove(name)
        self.draining.discard(name)
        self.removed.append(name)
        for link in (f"n-{name}", *(self.link(c, name) for c in self.coordinators)):
            self.proxies[link].retarget("127.0.0.1:1")  # nothing listens there
            self.proxies[link].cut("refuse")

    def names_by_id(self, nodes: list[dict[str, Any]]) -> dict[int, str]:
        """Coordinator node ids to the nemesis's names (a node advertises its n- proxy)."""
        by_address = {self.proxies[f"n-{n}"].address: n for n in self.all_nodes}
        by_address.update({self.procs[n].listen: n for n in self.all_nodes if n in self.procs})
        return {int(n["id"]): by_address[n["address"]] for n in nodes
                if n.get("address") in by_address}

    # ------------------------------------------------------------ signals

    def running(self, name: str) -> bool:
        return self.procs[name].child.running()

    def exit_status(self, name: str) -> int | None:
        return self.procs[name].child.poll()

    async def kill(self, name: str) -> None:
        """kill -9 by pid, and wait for the exit (a stopped process dies too)."""
        child = self.procs[name].child
        await trio.to_thread.run_sync(child.kill, signal.SIGKILL)
        self.procs[name].paused = False

    async def stop(self, name: str) -> None:
        """A clean stop (SIGCONT first: a paused process cannot act on SIGTERM)."""
        proc = self.procs[name]
        proc.child.send_signal(signal.SIGCONT)
        proc.paused = False
        await trio.to_thread.run_sync(proc.child.stop, 10.0)

    def pause(self, name: str) -> None:
        self.procs[name].child.send_signal(signal.SIGSTOP)
        self.procs[name].paused = True

    def resume(self, name: str) -> None:
        self.procs[name].child.send_signal(signal.SIGCONT)
        self.procs[name].paused = False

    async def stop_all(self) -> None:
        """Unmount, then stop every process (nodes first), each by its own pid."""
        for name in self.mounts:
            await self.mount_stop(name)
        for name in [*self.all_nodes, *self.coordinators, *self.etcd_members]:
            if name in self.procs and self.running(name):
                await self.stop(name)

    # ------------------------------------------------------------ bit rot

    async def corrupt_random_chunk(self, name: str, rng: random.Random, *, oldest: bool = False,
                                   avoid: frozenset[int] = frozenset(),
                                   only: frozenset[int] | None = None
                                   ) -> tuple[int, int] | None:
        """Flip one byte of a random chunk of a random COMMITTED blob of a stopped node.

        Uses the documented store layout (docs/design.md §3): `blobs` maps u64 BE ids to msgpack
        records, `chunks` keys are blob u64 BE + index u32 BE, values the 8-byte digest then
        the bytes. Blobs in `avoid` are left alone; with `only`, only those are candidates.
        Returns (blob, index), or None if the node holds no such committed blob.
        """
        assert not self.running(name), "stop the node before editing its store"
        return await trio.to_thread.run_sync(_flip_byte, self.root / name, rng, oldest, avoid,
                                             only)

    # ------------------------------------------------------------ clients and tools

    def client(self, via: str = "clients", factory: type[Client] = Client,
               **options: Any) -> Any:
        """A library client reaching the coordinators through the links of `via` ("": directly)."""
        options.setdefault("timeout", 5.0)
        options.setdefault("retry_for", 10.0)
        options.setdefault("commit_timeout", 30.0)
        address = self.coordinator_list(via) if via else self.coordinator
        return factory(address, self.secret, **options)

    async def dfs(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """Run the real `dfs` command against the coordinator's real address."""
        env = {**os.environ, "DFS_COORDINATOR": self.coordinator,
               "DFS_SECRET_FILE": str(self.secret_file)}
        with trio.fail_after(timeout):
            return await trio.run_process([*DFS, *args], capture_stdout=True,
                                          capture_stderr=True, check=False, env=env)

    async def status(self) -> dict[str, Any]:
        async with self.client(via="") as client:
            return await client.status()

    async def wait_nodes_up(self, count: int, timeout: float = START_TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    nodes = (await self.status())["nodes"]
                    if sum(n["state"] == "up" for n in nodes) >= count:
                        return
                except Exception:  # noqa: BLE001 - the coordinator may be restarting
                    pass
                await trio.sleep(0.2)

    def log_tail(self, name: str, lines: int = 20) -> str:
        if name in self.mounts:
            child = self.mounts[name].child
            return child.log_tail(lines) if child else ""
        return self.procs[name].child.log_tail(lines)

    # ------------------------------------------------------------ the FUSE mounts

    @property
    def mount_path(self) -> Path:
        """Where the writers' mount is."""
        return self.mounts[MOUNT].path

    @property
    def mount_child(self) -> Child | None:
        return self.mounts[MOUNT].child

    def mount_log(self, name: str = MOUNT) -> Path:
        """A mount's log, every start of it appended."""
        return self.root / f"{name}.log"

    def mount_running(self, name: str = MOUNT) -> bool:
        child = self.mounts[name].child
        return child is not None and child.running()

    def mount_ready(self, name: str = MOUNT) -> bool:
        """Whether the mount answers (started, and not being killed or stopped since)."""
        return self.mounts[name].ready and self.mount_running(name)

    async def mount_start(self, name: str = MOUNT) -> None:
        """`dfs mount --foreground`, through its own coordinator proxy; ready when it says so."""
        mount = self.mounts[name]
        mount.path.mkdir(parents=True, exist_ok=True)
        argv = [*DFS, "mount", str(mount.path), "--foreground",
                "--coordinator", self.coordinator_list(name),
                "--secret-file", str(self.secret_file),
                "--cache-dir", str(self.root / f"{name}-cache"), "--retry-timeout", "10",
                "--stop-timeout", str(MOUNT_STOP_TIMEOUT)]
        if mount.child is None:
            mount.child = Child(name, argv, self.mount_log(name))
        child = mount.child
        child.start({"DFS_LOG_LEVEL": "INFO", "DFS_LOG_FORMAT": "text"})  # mount_ends.py reads it
        with trio.fail_after(START_TIMEOUT):
            while not (MOUNT_READY in child.log_tail(200).encode() and _is_mounted(mount.path)):
                if child.poll() is not None:
                    raise RuntimeError(f"{name} exited with {child.poll()}: {child.log_tail()}")
                await trio.sleep(0.05)
        mount.ready = True

    async def mount_kill(self, name: str = MOUNT) -> None:
        """The mount process dies without cleanup; the dead mount point is detached lazily."""
        mount = self.mounts[name]
        mount.ready = False
        if mount.child is not None and mount.child.running():
            await trio.to_thread.run_sync(mount.child.kill, signal.SIGKILL)
        await _fusermount("-uz", mount.path)

    async def mount_terminate(self, name: str = MOUNT) -> str:
        """SIGTERM, as an operator's stop: the mount serves on for its --stop-timeout while
        writes are open, then drops them and unmounts. Killed (by its pid) if it has not
        exited a minute after that. What happened, in a few words."""
        mount = self.mounts[name]
        mount.ready = False
        child = mount.child
        if child is None or not child.running():
            return "not running"
        child.send_signal(signal.SIGTERM)
        with trio.move_on_after(MOUNT_STOP_TIMEOUT + 60):
            while child.running():
                await trio.sleep(0.05)
        how = "exited (status {}) after SIGTERM"
        if child.running():
            await trio.to_thread.run_sync(child.kill, signal.SIGKILL)
            how = "killed a minute past its --stop-timeout (status {})"
        await _fusermount("-uz", mount.path)
        return how.format(child.poll())

    async def mount_stop(self, name: str = MOUNT) -> None:
        """fusermount3 -u (lazily if busy), then make sure the process is gone, by its pid."""
        mount = self.mounts[name]
        mount.ready = False
        child = mount.child
        if child is None:
            return
        child.send_signal(signal.SIGCONT)
        for flag in ("-u", "-u", "-uz"):
            if not _is_mounted(mount.path) or await _fusermount(flag, mount.path):
                break
            await trio.sleep(0.5)
        with trio.move_on_after(15):
            while child.running():
                await trio.sleep(0.05)
        if child.running():
            await trio.to_thread.run_sync(child.stop, 5.0)


def _is_mounted(path: Path) -> bool:
    from fuse_mount.main import is_mounted

    return is_mounted(path)


async def _fusermount(flag: str, path: Path) -> bool:
    if not _is_mounted(path):
        return True
    with trio.move_on_after(30):
        result = await trio.run_process(["fusermount3", flag, str(path)], check=False,
                                        capture_stdout=True, capture_stderr=True)
        return result.returncode == 0
    return False


def _flip_byte(path: Path, rng: random.Random, oldest: bool, avoid: frozenset[int],
               only: frozenset[int] | None) -> tuple[int, int] | None:
    # A copy-on-write put needs free pages: map well past the file (lmdb's default of 10 MiB
    # may be all the node's map holds already, and then the edit fails with MDB_MAP_FULL).
    size = (path / "data.mdb").stat().st_size
    env = lmdb.open(str(path), max_dbs=8, subdir=True, lock=True, map_size=2 * size + 2**26)
    try:
        blobs_db, chunks_db = env.open_db(b"blobs"), env.open_db(b"chunks")
        with env.begin(write=True) as txn:
            committed = []
            for key, value in txn.cursor(db=blobs_db):
                record = msgpack.unpackb(value, raw=False)
                blob = struct.unpack(">Q", key)[0]
                if record.get("state") == "COMMITTED" and record.get("size") \
                        and blob not in avoid and (only is None or blob in only):
                    committed.append((blob, record))
            if not committed:
                return None
            # Half the time the oldest blob: a cold file's, which lives to the end of the run,
            # so the checker's repair has something to do; else any, perhaps read in the run.
            blob, record = min(committed, key=lambda c: c[0]) if oldest or rng.random() < 0.5 \
                else rng.choice(committed)
            index = rng.randrange(int(record.get("nchunks") or 1))
            key = struct.pack(">QI", blob, index)
            value = bytearray(txn.get(key, db=chunks_db) or b"")
            if len(value) <= 8:
                return None
            value[8 + rng.randrange(len(value) - 8)] ^= 1 << rng.randrange(8)
            txn.put(key, bytes(value), db=chunks_db)
        return blob, index
    finally:
        env.close()
