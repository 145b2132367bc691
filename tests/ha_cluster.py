"""A cluster whose metadata is in etcd: etcd members, several coordinators (one leads), nodes.

Like tests/cluster.py (every process a real `dfs` or `etcd`, stopped by its pid), plus:
- the coordinators are "coordinator-1", "coordinator-2", ... on addresses fixed before they
  start (the nodes and clients are given the whole list, `cluster.coordinator` = "A,B");
- a coordinator named in `proxied` reaches etcd through TcpProxy objects (one per member):
  `cut_off(name)` holds its etcd traffic (it still reaches the nodes), `heal(name)` lets it
  through again (what was held arrives late, as a partition's packets would).

    with HaCluster(tmp_path).start() as c:
        leader = c.leader(); c.kill(leader); c.wait_leader(other_than=leader)
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster import COORDINATOR_ARGS, START_TIMEOUT, Cluster
from etcd_harness import PORT_ATTEMPTS, EtcdCluster, TcpProxy, free_port

from dfs.cli.procs import DFS
from dfs.errors import DfsError

LEADER_TTL = "1"  # seconds: failover tests take a few seconds, not many


class HaCluster(Cluster):
    def __init__(self, root: Path, *, coordinators: int = 2, etcd_members: int = 3,
                 proxied: Sequence[str] = (), leader_ttl: str = LEADER_TTL,
                 coordinator_args: Sequence[str] = COORDINATOR_ARGS, **options: Any) -> None:
        super().__init__(root, coordinator_args=coordinator_args, **options)
        self.etcd = EtcdCluster(self.root / "etcd", members=etcd_members)
        self.coordinator_names = [f"coordinator-{i}" for i in range(1, coordinators + 1)]
        self.addresses = {name: f"127.0.0.1:{free_port()}" for name in self.coordinator_names}
        self.coordinator = ",".join(self.addresses.values())
        self.leader_ttl = leader_ttl
        self.proxies: dict[str, list[TcpProxy]] = {name: [] for name in proxied}

    def __enter__(self) -> HaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # ------------------------------------------------------------ processes

    @property
    def node_names(self) -> list[str]:
        return [n for n in self.procs if n not in self.addresses]

    def meta_url(self, name: str) -> str:
        proxies = self.proxies.get(name)
        endpoints = [p.endpoint for p in proxies] if proxies else self.etcd.endpoints
        return "etcd://" + ",".join(endpoints)

    def _argv(self, name: str, listen: str) -> list[str]:
        if name not in self.addresses:
            return super()._argv(name, listen)
        return [*DFS, "--secret-file", str(self.secret_file), "coordinator",
                "--data", str(self.data_dir(name)), "--listen", self.addresses[name],
                "--replicas", str(self.replicas), "--meta", self.meta_url(name),
                "--leader-ttl", self.leader_ttl, *self.coordinator_args,
                *self.extra_args.get(name, ())]

    def start(self) -> HaCluster:
        """etcd, then the first coordinator (it leads), the others, then the nodes; a start
        that fails stops what it started (the caller's `with` is never entered)."""
        try:
            return self._start()
        except BaseException:
            self.stop_all()
            raise

    def _start(self) -> HaCluster:
        self.etcd.start()
        for proxies in self.proxies.values():
            proxies.extend(TcpProxy(endpoint) for endpoint in self.etcd.endpoints)
        first, *others = self.coordinator_names
        self._spawn_coordinator(first)
        self.wait_leader(first)
        for name in others:
            self._spawn_coordinator(name)
        for i in range(1, self.nodes + 1):
            self.add_node(f"node-{i}", wait=False)
        self.wait_nodes_up()
        return self

    def _spawn_coordinator(self, name: str) -> None:
        """Its address is picked before it starts (the nodes get the list): if another
        process took the port meanwhile, pick again (nobody has been given it yet)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._spawn(name, self.addresses[name], None)
                return
            except DfsError:
                if attempt == PORT_ATTEMPTS - 1 or \
                        "address already in use" not in self.log(name, 20).lower():
                    raise
            self.addresses[name] = f"127.0.0.1:{free_port()}"
            self.coordinator = ",".join(self.addresses.values())

    def restart(self, name: str, env: Any = None, *, wait: bool = True,
                args: Sequence[str] | None = None) -> None:
        if name not in self.addresses:
            super().restart(name, env, wait=wait, args=args)
            return
        if args is not None:
            self.extra_args[name] = list(args)
        child = self.procs[name]
        if child.running():
            child.stop()
        self._spawn(name, self.addresses[name], env)

    def stop_all(self) -> None:
        for name in [*self.node_names, *self.coordinator_names]:
            child = self.procs.get(name)
            if child is not None:
                child.kill(signal.SIGCONT)
                child.stop(timeout=5)
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.stop()
        self.etcd.stop_all()

    # ------------------------------------------------------------ leadership

    def leader(self) -> str | None:
        """The coordinator that leads now, as the cluster's status says (None: no answer)."""
        result = self.dfs("status", "--json", timeout=30)
        if result.returncode != 0:
            return None
        leader = (json.loads(result.stdout).get("meta") or {}).get("leader")
        return next((n for n, a in self.addresses.items() if a == leader), None)

    def wait_leader(self, name: str | None = None, *, other_than: str | None = None,
                    timeout: float = START_TIMEOUT) -> str:
        def found() -> str | None:
            leader = self.leader()
            if leader is None or leader == other_than or (name and leader != name):
                return None
            return leader

        return str(self.wait_until(found, timeout, interval=0.1,
                                   message=f"a leader ({name or 'any'}, not {other_than})"))

    def cut_off(self, name: str) -> None:
        for proxy in self.proxies[name]:
            proxy.mode = "hold"

    def heal(self, name: str) -> None:
        for proxy in self.proxies[name]:
            proxy.mode = "pass"
            proxy.release()
