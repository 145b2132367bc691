"""The nemesis: random faults against a running cluster, each one healed by itself.

A fault is a task: it claims its targets (so two faults never fight over one process), breaks
something, holds it for a random while (cut short when the campaign ends), then heals it in a
shielded scope, so even a cancelled campaign leaves no process paused, no link cut and no
failpoint armed. At most `max_active` faults run at once; which one comes next, where and for
how long is drawn from the campaign's seeded generator.

Kinds (docs/design.md §8 and issue 5): kill (kill -9, then restart), pause (SIGSTOP longer than
the timeouts, then SIGCONT), partition-node and partition-coordinator (through the proxies,
refusing or black-holing), slow (latency on a link), disk-full (a node restarted with a
capacity it has already used up), bitflip (a byte of a stopped node's LMDB flipped), failpoint
(a process restarted with a §8 failpoint armed: crash, error or delay), kill-mount and
stop-mount (the writers' mount killed, or stopped with SIGTERM, while the mount load's line
writer is mid-write), kill-writer (that line writer killed by SIGKILL or SIGTERM mid-write),
and the operator's drain and remove of a node (membership.py). With the metadata on etcd
(`--ha`), also kill-leader, pause-leader, kill-etcd, etcd-majority and partition-leader-etcd
(ha_faults.py); they are drawn only in that mode.

Every bit flip goes into the `Ledger` (judge.py), with the nodes removed or left down: the
final check's findings are judged against it. A blob is only ever flipped on one node, so the
nemesis alone never destroys every good copy of a file.
"""

from __future__ import annotations

import random
import signal
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from dfs.failpoints import NAMES as FAILPOINTS
from dfs.nemesis.checker import Violation
from dfs.nemesis.cluster import MOUNT, NemesisCluster
from dfs.nemesis.ha_faults import HA_KINDS, HaFaults
from dfs.nemesis.history import History
from dfs.nemesis.judge import Ledger
from dfs.nemesis.membership import Membership
from dfs.nemesis.mount_load import KILLED_FILE, STOPPED_FILE, MountLoad
from dfs.nemesis.proxy import BLACKHOLE, REFUSE
from dfs.rpc import Peer

#: How long --cover may run past the campaign's duration to start every kind once.
COVER_GRACE = 120.0
KINDS = ("kill", "pause", "partition-node", "partition-coordinator", "slow", "disk-full",
         "bitflip", "failpoint", "kill-mount", "stop-mount", "kill-writer", "drain", "remove",
         *HA_KINDS)
WEIGHTS = (3, 3, 3, 2, 2, 2, 2, 3, 1, 1, 1, 1, 1, 3, 2, 2, 1, 2)
WRITER = "line-writer"  # kill-writer's target: the mount load's line writer
MOUNT_WAIT = 30.0  # kill-writer waits this long at most for the writers' mount to answer


class Nemesis(HaFaults):
    def __init__(self, cluster: NemesisCluster, history: History, rng: random.Random, *,
                 max_active: int = 2, interval: tuple[float, float] = (0.5, 3.0),
                 kinds: tuple[str, ...] = KINDS, mount: bool = True, cover: bool = False,
                 strict_exits: bool = False, load: MountLoad | None = None) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = rng
        self.max_active = max_active
        self.interval = interval
        wanted = {"kill-mount": mount, "stop-mount": mount, "kill-writer": load is not None}
        self.kinds = [k for k in kinds if wanted.get(k, True)
                      and (cluster.ha or k not in HA_KINDS)]
        self.mount = mount
        self.load = load
        # cover: each kind once first (in order; one that finds no target now goes last)
        self.uncovered = list(self.kinds) if cover else []
        self.counts: Counter[str] = Counter()
        self.details: Counter[str] = Counter()  # e.g. failpoint fired, cut modes
        self.ledger = Ledger()
        self.membership = Membership(cluster, history, rng)
        self.errors: list[str] = []  # faults that could not be injected or healed
        self.findings: list[Violation] = []  # what a fault itself saw go wrong (ha_faults)
        self.takeovers: list[float] = []  # seconds from a leader's loss to the next leader
        self.etcd_down: set[str] = set()
        self.strict_exits = strict_exits
        self.busy: set[str] = set()
        self.active = 0
        self._heal_now = trio.Event()

    # ------------------------------------------------------------ scheduling

    async def run(self, duration: float) -> None:
        """Start faults for `duration` seconds, then end the held ones and wait for the heals."""
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            if self.cluster.ha:
                supervisor = trio.CancelScope()
                nursery.start_soon(self._supervise, supervisor)
            while (deadline := self._deadline(start, duration)) > trio.current_time():
                await trio.sleep(min(self.rng.uniform(*self.interval),
                                     max(0.0, deadline - trio.current_time())))
                if self.active >= self.max_active or trio.current_time() >= deadline:
                    continue
                weights = [WEIGHTS[KINDS.index(k)] for k in self.kinds]
                kind = self.uncovered[0] if self.uncovered else \
                    self.rng.choices(self.kinds, weights)[0]
                fault = getattr(self, "_" + kind.replace("-", "_"))
                target = await self._choose(kind)
                if self.uncovered:  # tried: next time the next one (this one again later)
                    self.uncovered.remove(kind)
                    if target is None or target in self.busy:
                        self.uncovered.append(kind)
                if target is None or target in self.busy:
                    continue
                self.active += 1
                self.busy.add(target)
                nursery.start_soon(self._run_fault, kind, target, fault)
            self._heal_now.set()
            if self.cluster.ha:
                supervisor.cancel()

    def _deadline(self, start: float, duration: float) -> float:
        """The end of the fault phase: `duration`, or with --cover and a kind not yet run,
        up to COVER_GRACE more (on a slow machine faults last longer, and a kind whose target
        stays busy would otherwise be left out: --cover promises every kind once)."""
        return start + duration + (COVER_GRACE if self.uncovered else 0.0)

    async def _choose(self, kind: str) -> str | None:
        if kind in HA_KINDS:
            return await self._choose_ha(kind)
        nodes = list(self.cluster.nodes)
        coordinators = list(self.cluster.coordinators)
        options: list[str] = {
            "kill": [*coordinators, *nodes],
            "pause": [*coordinators, *nodes, *([MOUNT] if self.mount else [])],
            "partition-node": nodes,
            "partition-coordinator": coordinators,
            "slow": [*coordinators, *nodes],
            "disk-full": nodes,
            "bitflip": nodes,
            "failpoint": [*coordinators, *nodes],
            "kill-mount": [MOUNT],
            "stop-mount": [MOUNT],
            "kill-writer": [WRITER],
            "drain": self.membership.drain_targets(),
            "remove": self.membership.remove_targets(),
        }[kind]
        free = [t for t in options if t not in self.busy]
        return self.rng.choice(free) if free else None

    async def _run_fault(self, kind: str, target: str,
                         fault: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
        self.counts[kind] += 1
        try:
            await fault(target)
        except Exception as e:  # noqa: BLE001 - kept; the campaign heals, judges, and fails
            trace = "".join(traceback.format_exception(e))
            self.errors.append(f"{kind} on {target}: {type(e).__name__}: {e}")
            self.history.note("fault error", kind=kind, target=target, traceback=trace)
        finally:
            self.busy.discard(target)
            self.active -= 1

    async def _hold(self, low: float, high: float) -> None:
        """Keep the fault for a random while, or until the campaign ends."""
        with trio.move_on_after(self.rng.uniform(low, high)):
            await self._heal_now.wait()

    @asynccontextmanager
    async def _recorded(self, kind: str, target: str, **details: Any) -> Any:
        self.history.fault(kind, "start", target, **details)
        try:
            yield
        finally:
            self.history.fault(kind, "stop", target)

    @property
    def corrupted(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.ledger.flips]

    async def _restart_clean(self, name: str) -> None:
        """Start a process again with no failpoint and its normal capacity."""
        if self.cluster.running(name):
            await self.cluster.stop(name)
        await self.cluster.start_proc(name)

    # ------------------------------------------------------------ processes

    async def _kill(self, target: str) -> dict[str, Any]:
        async with self._recorded("kill", target):
            await self.cluster.kill(target)
            try:
                await self._hold(0.2, 4.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self.cluster.start_proc(target)
        return {}

    async def _pause(self, target: str) -> dict[str, Any]:
        async with self._recorded("pause", target):
            if target == MOUNT:
                if not self.cluster.mount_running():
                    return {}
                assert self.cluster.mount_child is not None
                self.cluster.mount_child.send_signal(signal.SIGSTOP)
                try:
                    await self._hold(2.5, 8.0)
                finally:
                    self.cluster.mount_child.send_signal(signal.SIGCONT)
                return {}
            self.cluster.pause(target)
            try:
                await self._hold(2.5, 9.0)  # past node, vote and RPC timeouts
            finally:
                self.cluster.resume(target)
        return {}

    async def _failpoint(self, target: str) -> dict[str, Any]:
        prefix = "coordinator." if target in self.cluster.coordinators else "node."
        name = self.rng.choice(sorted(n for n in FAILPOINTS if n.startswith(prefix)))
        action = self.rng.choices(
            ["crash", "error", f"delay:{self.rng.randrange(500, 4000)}"], [5, 2, 2])[0]
        spec = f"{name}={action}"
        async with self._recorded("failpoint", target, failpoint=spec):
            self.details[f"failpoint {name}={action.split(':')[0]}"] += 1
            await self.cluster.stop(target)
            try:
                await self.cluster.start_proc(target, env={"DFS_FAILPOINTS": spec})
                with trio.move_on_after(self.rng.uniform(3.0, 10.0)):
                    while self.cluster.running(target) and not self._heal_now.is_set():
                        await trio.sleep(0.1)
                if not self.cluster.running(target):
                    self.details["failpoint fired (crash)"] += 1
                    self.history.note("failpoint fired", target=target, failpoint=spec,
                                      status=self.cluster.exit_status(target))
                    await self._hold(0.1, 2.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self._restart_clean(target)
        return {}

    # ------------------------------------------------------------ network

    async def _partition_node(self, target: str) -> dict[str, Any]:
        mode = self.rng.choice([REFUSE, BLACKHOLE])
        # isolated: nobody reaches it and it reaches nobody; inbound: it still heartbeats, so
        # the coordinator keeps placing replicas on a node no one can reach; heartbeat: only
        # its link to the coordinator is cut, so it is declared down while clients reach it.
        shape = self.rng.choice(["isolated", "isolated", "inbound", "heartbeat"])
        heartbeats = [self.cluster.link(c, target) for c in self.cluster.coordinators]
        links = {"isolated": [f"n-{target}", *heartbeats], "inbound": [f"n-{target}"],
                 "heartbeat": heartbeats}[shape]
        self.details[f"partition-node {shape}/{mode}"] += 1
        async with self._recorded("partition-node", target, mode=mode, shape=shape):
            await self._cut(links, mode, 2.0, 8.0)
        return {}

    async def _partition_coordinator(self, target: str) -> dict[str, Any]:
        """Every link into the coordinator; in HA mode half the time its etcd links too
        (isolated: it loses its lease and the standby takes over)."""
        mode = self.rng.choice([REFUSE, BLACKHOLE])
        links = self.cluster.links_of(target)
        shape = "clients"
        if self.cluster.ha and self.rng.random() < 0.5:
            shape = "isolated"
            links += self.cluster.etcd_links(target)
        self.details[f"partition-coordinator {shape}/{mode}"] += 1
        async with self._recorded("partition-coordinator", target, mode=mode, shape=shape):
            await self._cut(links, mode, 2.0, 6.0)
        return {}

    async def _cut(self, links: list[str], mode: str, low: float, high: float) -> None:
        proxies = [self.cluster.proxies[name] for name in links]
        for proxy in proxies:
            proxy.cut(mode)
        try:
            await self._hold(low, high)
        finally:
            for proxy in proxies:
                proxy.heal()

    async def _slow(self, target: str) -> dict[str, Any]:
        if target in self.cluster.coordinators:
            links = self.cluster.links_of(target)
        else:
            links = [f"n-{target}"]
        delay = self.rng.choice([0.02, 0.1, 0.3, 0.8, 1.5])
        async with self._recorded("slow", target, delay=delay):
            proxies = [self.cluster.proxies[name] for name in links]
            for proxy in proxies:
                proxy.slow(delay)
            try:
                await self._hold(3.0, 10.0)
            finally:
                for proxy in proxies:
                    proxy.slow(0.0)
        return {}

    # ------------------------------------------------------------ disks

    async def _disk_full(self, target: str) -> dict[str, Any]:
        used = await self._node_used(target)
        margin = self.rng.choice([0, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024])
        capacity = (used or 0) + margin
        async with self._recorded("disk-full", target, capacity=capacity, used=used):
            await self.cluster.stop(target)
            try:
                await self.cluster.start_proc(target, capacity=capacity)
                await self._hold(3.0, 10.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self._restart_clean(target)
        return {}

    async def _node_used(self, name: str) -> int | None:
        peer = Peer(self.cluster.procs[name].listen, self.cluster.secret, timeout=3.0)
        try:
            return int((await peer.call("node_info"))["used"])
        except Exception:  # noqa: BLE001 - unknown usage: the node fills at once
            return None
        finally:
            await peer.aclose()

    async def _bitflip(self, target: str) -> dict[str, Any]:
        async with self._recorded("bitflip", target):
            if self.rng.random() < 0.5:
                await self.cluster.kill(target)
            else:
                await self.cluster.stop(target)
            try:
                await self._flip(target, oldest=False)
                await self._hold(0.1, 2.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self.cluster.start_proc(target)
        return {}

    async def _flip(self, target: str, *, oldest: bool, only: frozenset[int] | None = None
                    ) -> bool:
        """Flip a bit of a stopped node's blob (never one already flipped on another node)."""
        avoid = frozenset(self.ledger.flipped_elsewhere(target))
        flipped = await self.cluster.corrupt_random_chunk(target, self.rng, oldest=oldest,
                                                          avoid=avoid, only=only)
        if flipped is None:
            return False
        blob, index = flipped
        self.ledger.flip(target, blob, index, self.history.now())
        self.history.note("bit flipped", target=target, blob=blob, index=index)
        return True

    # ------------------------------------------------------------ membership

    async def _drain(self, target: str) -> dict[str, Any]:
        async with self._recorded("drain", target):
            outcome = await self.membership.drain(target)
            self.details[f"drain {outcome}"] += 1
        return {}

    async def _remove(self, target: str) -> dict[str, Any]:
        async with self._recorded("remove", target):
            outcome = await self.membership.remove(target)
            self.details[f"remove {outcome}"] += 1
            if target in self.cluster.removed:
                self.ledger.removed.add(target)
        return {}

    # ------------------------------------------------------------ the mount

    async def _kill_mount(self, target: str) -> dict[str, Any]:
        async with self._recorded("kill-mount", target):
            try:
                await self._mid_write(self._mount_killed)
                await self._hold(0.5, 3.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self.cluster.mount_start()
        return {}

    async def _mount_killed(self) -> str:
        await self.cluster.mount_kill()
        return "its mount killed"

    async def _stop_mount(self, target: str) -> dict[str, Any]:
        """SIGTERM: the mount serves on for its --stop-timeout while the line writer (which
        never closes) holds a write, then drops it, says so in its log, and exits."""
        stopped: list[str] = []

        async def stop() -> str:
            stopped.append(await self.cluster.mount_terminate())
            return f"its mount {stopped[-1]}"

        async with self._recorded("stop-mount", target):
            try:
                how, written = await self._mid_write(stop)
                self.details[f"stop-mount: {stopped[-1] if stopped else 'not stopped'}"] += 1
                if stopped and stopped[-1].startswith("exited") and written:
                    self._check_dropped(how, written)
                await self._hold(0.5, 3.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self.cluster.mount_start()
        return {}

    def _check_dropped(self, how: str, written: int) -> None:
        """A mount stopped while a write was open says, in its log, that it dropped it."""
        assert self.load is not None
        file = "/" + self.load.file(STOPPED_FILE)
        said = "dropped the uncommitted writes to " + file + " "
        if not any(said in line for line in self.cluster.log_tail(MOUNT, 100_000).splitlines()):
            self.findings.append(Violation(
                "stop-unlogged", file, f"the mount stopped with SIGTERM while {file} held "
                f"{written} line(s) never closed ({how}); its log does not say it dropped them"))

    async def _mid_write(self, action: Callable[[], Awaitable[str]]) -> tuple[str, int]:
        """`action` on the writers' mount while the mount load's line writer is mid-write
        (without a load, just the action): what happened, and the lines it had written."""
        if self.load is None:
            return await action(), 0
        return await self.load.interrupt_lines(STOPPED_FILE, lambda _: action(), self.rng)

    async def _kill_writer(self, target: str) -> dict[str, Any]:
        """The line writer killed mid-write by SIGKILL or SIGTERM (the default action: it
        dies): the mount must commit nothing of it."""
        sig = self.rng.choice([signal.SIGKILL, signal.SIGTERM])

        async def kill(process: trio.Process) -> str:
            process.send_signal(sig)
            return f"killed by {sig.name}"

        assert self.load is not None
        with trio.move_on_after(MOUNT_WAIT):  # another fault may have it down a while
            while not self.cluster.mount_ready() and not self._heal_now.is_set():
                await trio.sleep(0.1)
        if not self.cluster.mount_ready() or self._heal_now.is_set():
            self.details["kill-writer skipped: the mount was down"] += 1
            return {}
        async with self._recorded("kill-writer", target, signal=sig.name):
            _, written = await self.load.interrupt_lines(KILLED_FILE, kill, self.rng)
            self.details[f"kill-writer {sig.name}" + ("" if written else
                                                      ", before its first line")] += 1
        return {}

    # ------------------------------------------------------------ the end

    async def last_bitflip(self, current: dict[str, frozenset[int]]) -> None:
        """One more flipped bit once the load has stopped, in a file's current blob (the
        oldest, a cold file's, if it may) on a node that holds one: no reader will trip over
        it, so the judged check must find it and `dfs check --deep --repair` repair it."""
        self.counts["bitflip"] += 1
        self.details["bitflip after the load (for dfs check)"] += 1
        nodes = [n for n in (self.membership.eligible() or self.cluster.nodes) if current.get(n)]
        self.rng.shuffle(nodes)
        for target in nodes:
            async with self._recorded("bitflip", target, last=True):
                await self.cluster.stop(target)
                try:
                    if await self._flip(target, oldest=True, only=current[target]):
                        return
                finally:
                    await self.cluster.start_proc(target)

    async def heal_everything(self) -> list[str]:
        """After the campaign: whatever state anything is in, make it whole. What was done."""
        done: list[str] = []
        self.cluster.proxies.heal_all()
        for name in self.cluster.etcd_members:
            if not self.cluster.running(name):
                await self.cluster.start_proc(name)
                done.append(f"restarted {name}")
        self.etcd_down.clear()
        for name in [*self.cluster.coordinators, *self.cluster.nodes]:
            proc = self.cluster.procs[name]
            if proc.paused:
                self.cluster.resume(name)
                done.append(f"resumed {name}")
            if not self.cluster.running(name) or proc.env or proc.capacity is not None:
                await self._restart_clean(name)
                done.append(f"restarted {name} clean")
        if self.cluster.ha:
            leader = await self.cluster.wait_leader()
            done.append(f"{leader or 'no coordinator'} leads")
        for name in self.cluster.mounts if self.mount else ():
            if not self.cluster.mount_running(name):
                await self.cluster.mount_kill(name)
                await self.cluster.mount_start(name)
                done.append(f"remounted {name}")
        self.ledger.down = {n for n in self.cluster.nodes if not self.cluster.running(n)}
        return done
