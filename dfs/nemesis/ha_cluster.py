"""The HA half of the nemesis's cluster (issue 10): the etcd members, the leader's address
translated for the proxies, and each coordinator's own word on its role.

Mixed into `NemesisCluster` (cluster.py), whose attributes these are; see its docstring for
the topology.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from dfs.cli.etcd_members import LocalEtcd, healthy
from dfs.rpc import Peer

if TYPE_CHECKING:
    from dfs.nemesis.cluster import Proc
    from dfs.nemesis.proxy import Proxies

COORDINATOR = "coordinator"  # the one coordinator of the LMDB mode
HA_COORDINATORS = ("coordinator-1", "coordinator-2")
ETCD_MEMBERS = 3
LEADER_TTL = 1  # seconds of the leader's lease: failovers take a few seconds, not many
ETCD_READY = 20.0  # a restarted etcd member rejoins its cluster within this
INFO_TIMEOUT = 1.5  # asking one coordinator its role
START_TIMEOUT = 30.0


class HaMembers:
    """Mixed into NemesisCluster: these attributes are its own."""

    root: Any
    ha: bool
    secret: bytes
    proxies: Proxies
    procs: dict[str, Proc]
    coordinators: list[str]
    real: dict[str, str]
    etcd: LocalEtcd | None
    etcd_members: list[str]

    def link(self, coordinator: str, who: str) -> str:
        raise NotImplementedError

    def _translate(self, who: str, msg: dict[str, Any]) -> None:
        """A NOT_LEADER naming a coordinator's real address names who's proxy to it instead."""
        leader = msg.get("leader")
        if msg.get("error") != "NOT_LEADER" or not isinstance(leader, str):
            return
        for name, real in self.real.items():
            if real == leader:
                proxy = self.proxies[self.link(name, who)].address
                msg["leader"] = proxy
                msg["msg"] = str(msg.get("msg", "")).replace(real, proxy)
                return

    async def etcd_start(self) -> None:
        """Three etcd members under the root; each coordinator reaches each through a proxy."""
        from dfs.nemesis.cluster import Proc  # the cluster module imports this one

        self.etcd = LocalEtcd(self.root, ETCD_MEMBERS, token=f"dfs-nemesis-{self.root.name}")
        # Started here, not by LocalEtcd.start in a worker thread: the members die with the
        # thread that spawned them (PR_SET_PDEATHSIG), and trio retires idle worker threads.
        for member, child in zip(self.etcd.members, self.etcd.children, strict=True):
            self.etcd_members.append(member.name)
            self.procs[member.name] = Proc(member.name, child, listen=member.endpoint)
            child.start()
            for k in range(1, len(self.coordinators) + 1):
                await self.proxies.add(f"e{k}-{member.name}", member.endpoint)
        for name in self.etcd_members:
            if not await self._etcd_healthy(name, START_TIMEOUT):
                raise RuntimeError(f"{name} is not healthy after {START_TIMEOUT:g} s: "
                                   f"{self.procs[name].child.log_tail(5)}")

    async def etcd_restart(self, name: str) -> None:
        """Start a killed etcd member again (same ports, same data); wait a while for it to
        be healthy, which needs a majority: with one member of three up it never is."""
        proc = self.procs[name]
        assert not proc.child.running(), f"{name} is running"
        proc.paused = False
        proc.child.start()
        await self._etcd_healthy(name, ETCD_READY)

    async def _etcd_healthy(self, name: str, timeout: float) -> bool:
        proc = self.procs[name]
        with trio.move_on_after(timeout):
            while not await trio.to_thread.run_sync(healthy, proc.listen, 0.5):
                if not proc.child.running():
                    raise RuntimeError(f"{name} exited with {proc.child.poll()}: "
                                       f"{proc.child.log_tail(5)}")
                await trio.sleep(0.2)
            return True
        return False

    async def roles(self) -> dict[str, str]:
        """Each coordinator's own word on its role ("leader", "standby"; "down", "paused"
        or "unreachable" when it cannot say), asked at its real address."""
        out: dict[str, str] = {}
        for name in self.coordinators:
            proc = self.procs.get(name)
            if proc is None or not proc.child.running():
                out[name] = "down"
                continue
            if proc.paused:
                out[name] = "paused"
                continue
            peer = Peer(self.real[name], self.secret, timeout=INFO_TIMEOUT)
            try:
                with trio.fail_after(INFO_TIMEOUT + 0.5):
                    out[name] = str((await peer.call("coordinator_info")).get("role"))
            except Exception:  # noqa: BLE001 - down, starting, or stuck: it cannot say
                out[name] = "unreachable"
            finally:
                await peer.aclose()
        return out

    async def leader(self) -> str | None:
        """The coordinator that says it leads now (None: none does)."""
        if not self.ha:
            return COORDINATOR
        leaders = [n for n, role in (await self.roles()).items() if role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    async def wait_leader(self, name: str | None = None, *, other_than: str | None = None,
                          timeout: float = START_TIMEOUT) -> str | None:
        """Wait (bounded) for a leader (`name`, or any but `other_than`); None if none came."""
        with trio.move_on_after(timeout):
            while True:
                if not self.ha:
                    return COORDINATOR
                # Another than `other_than` leads, whatever `other_than` still believes.
                leaders = [n for n, role in (await self.roles()).items() if role == "leader"
                           and n != other_than and name in (None, n)]
                if len(leaders) == 1:
                    return leaders[0]
                await trio.sleep(0.1)
        return None
