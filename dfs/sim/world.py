"""The simulated world: one trio run under MockClock, one seeded random source, processes that
crash and restart, links that are cut and heal.

Everything random comes from `World.rng` (and trio's own scheduler, seeded from it), time is
trio's virtual clock, and nothing touches a socket or a thread, so one seed gives one trace.
A process is the real server code (dfs/sim/processes.py) running in a cancel scope of its
own: a crash cancels that scope at once, whatever the process was doing, and its disks keep
only what was forced (dfs/sim/lmdb_model.py); a restart runs the same code again over what
survived.
"""

from __future__ import annotations

import abc
import contextvars
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from dfs import runtime

EPOCH_NS = 1_800_000_000 * 10**9  # the simulated wall clock starts here (2027)


@dataclass
class Faults:
    """How hostile a run is: probabilities per message, per process step, or per second."""

    drop: float = 0.01  # a request or reply is lost
    duplicate: float = 0.02  # a request is delivered twice
    max_delay: float = 0.02  # seconds one way; reordering comes from random delays
    crash_point: float = 0.01  # at a failpoint (docs/design.md §8), the process crashes there
    crash_rate: float = 0.02  # per process per simulated second, a crash anywhere
    restart_after: tuple[float, float] = (0.2, 4.0)
    partition_rate: float = 0.02  # per second, a random link is cut...
    partition_for: tuple[float, float] = (0.5, 6.0)  # ...for this long
    blackhole: float = 0.5  # a cut link swallows messages (else it refuses them)
    disk_full_rate: float = 0.01  # per second, a node's disk fills up for a while
    disk_full_for: tuple[float, float] = (0.5, 4.0)
    bitrot_rate: float = 0.01  # per second, a byte of a committed chunk on a node flips


NO_FAULTS = Faults(drop=0, duplicate=0, crash_point=0, crash_rate=0, partition_rate=0,
                   disk_full_rate=0, bitrot_rate=0)

_CURRENT: contextvars.ContextVar[SimProcess] = contextvars.ContextVar("sim_process")


class SimProcess(abc.ABC):
    """A simulated process. `run` is one incarnation: the real code, until cancelled."""

    crashable = True  # the world's chaos may crash it
    partitionable = True  # the world's chaos may cut its links

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.up = True
        self.incarnation = 0
        self._scope: trio.CancelScope | None = None
        self._restarted = trio.Event()

    @abc.abstractmethod
    async def run(self) -> None: ...

    def on_crash(self) -> None:  # noqa: B027 - a process without disks keeps nothing
        """Drop what was not forced (the disks); called as the incarnation is cancelled."""

    async def supervise(self) -> None:
        while True:
            if self.up:
                self.world.enter(self)
                await self._incarnation()
                self._scope = None
            if self.world.stopping:
                return
            await self._restarted.wait()
            self._restarted = trio.Event()

    def _torn_down(self, incarnation: int) -> bool:
        """Was that incarnation crashed, or is the world ending it?"""
        return self.incarnation != incarnation or self.world.stopping

    async def _incarnation(self) -> None:
        incarnation = self.incarnation
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await self.run()
            except BaseException as e:
                errors, rest = _errors_and_rest(e)
                if errors is not None:
                    if self._torn_down(incarnation):
                        # Shielded code of a crashed incarnation (a repair's decision, a
                        # replica marked bad) ran on into the writer and environment the
                        # crash took away (WriterStopped, a closed LMDB). A real crash stops
                        # it dead: an artifact of crashing inside one process, not a finding.
                        self.world.log(f"{self.name}: after its crash: {errors!r}")
                    else:  # a server that dies on its own is a finding
                        self.world.violation(f"{self.name} died: {errors!r}")
                        self.world.crash(self)
                if rest is not None:
                    raise rest from None  # Cancelled: this scope (or the world's) takes it

    def crash(self) -> None:
        if not self.up:
            return
        self.world.log(f"CRASH {self.name}")
        self.up = False
        self.incarnation += 1
        if self._scope is not None:
            self._scope.cancel()
        self.on_crash()

    def restart(self) -> None:
        if self.up:
            return
        self.world.log(f"RESTART {self.name}")
        self.up = True
        self._restarted.set()


def _errors_and_rest(
    error: BaseException,
) -> tuple[BaseException | None, BaseException | None]:
    """Split what a process's run raised into its Exceptions and the rest (Cancelled)."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(Exception)
    if isinstance(error, Exception):
        return error, None
    return None, error


class SimHost(runtime.Host):
    """Wall time follows the virtual clock; worker threads run inline after a seeded delay
    (a worker's latency: an fsync takes time, and others run meanwhile)."""

    THREAD_LATENCY = 0.002  # seconds at most

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def wall_ns(self) -> int:
        return EPOCH_NS + int(trio.current_time() * 1e9)

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.sleep(self.rng.uniform(0.0, self.THREAD_LATENCY))
        return fn(*args)


class World:
    def __init__(self, seed: int, faults: Faults) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.processes: dict[str, SimProcess] = {}
        self.cut: dict[frozenset[str], tuple[float, str]] = {}  # link -> (heals at, how)
        self.trace: list[str] = []
        self.faults_injected: dict[str, int] = {}
        self.violations: list[str] = []
        self.calm = False  # once set: no new faults; cut links heal; the crashed return
        self.stopping = False
        self.disks: Any = None  # dfs.sim.disks.WorldDisks, set by the run
        self.ready = trio.Event()  # the scenario has set the cluster up: users may start
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ processes

    def add(self, process: SimProcess) -> None:
        self.processes[process.name] = process

    def current(self) -> SimProcess:
        return _CURRENT.get()

    def enter(self, process: SimProcess) -> None:
        """The calling task belongs to `process` from now on (and the tasks it spawns)."""
        _CURRENT.set(process)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A task of the world itself (messages in transit), not of any process."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------ randomness and faults

    def chance(self, what: str) -> bool:
        if self.calm:
            return False
        p = getattr(self.faults, what)
        if p and self.rng.random() < p:
            self.count(what)
            return True
        return False

    def delay(self) -> float:
        return self.rng.uniform(0.0002, self.faults.max_delay)

    def count(self, fault: str) -> None:
        self.faults_injected[fault] = self.faults_injected.get(fault, 0) + 1

    def link_state(self, a: str, b: str) -> str:
        """open, refuse or blackhole."""
        cut = self.cut.get(frozenset((a, b)))
        if cut is None:
            return "open"
        heals, how = cut
        if trio.current_time() >= heals:
            del self.cut[frozenset((a, b))]
            return "open"
        return how

    def log(self, text: str) -> None:
        self.trace.append(f"{trio.current_time():10.4f} {text}")

    def violation(self, text: str) -> None:
        self.log(f"VIOLATION {text}")
        self.violations.append(text)

    async def crash_point(self, name: str) -> None:
        """The failpoint hook: maybe crash the process that reached `name`, right there."""
        process = _CURRENT.get(None)
        if process is None or not process.crashable or not self.chance("crash_point"):
            return
        self.count(f"crash at {name}")
        if self.rng.random() < 0.5:
            # Stall first, then crash: what others can observe of a half-done step (a batch
            # committed, not flushed) is seen, and then the process dies.
            await trio.sleep(self.rng.uniform(0.0, 0.05))
            if not process.up:
                await trio.sleep_forever()
        self.log(f"crash point {name} in {process.name}")
        self.crash(process)
        await trio.sleep_forever()  # the cancellation arrives here: the rest never runs

    def crash(self, process: SimProcess) -> None:
        process.crash()
        self.spawn(self._restart_later, process)

    async def _restart_later(self, process: SimProcess) -> None:
        await trio.sleep(self.rng.uniform(*self.faults.restart_after))
        process.restart()

    # ------------------------------------------------------------ the run

    async def run(self, main: Callable[[], Awaitable[None]], limit: float) -> None:
        """Run `main` with every process; a run that is not over after `limit` simulated
        seconds is a violation (something waits forever), not a hang of the simulator."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for process in self.processes.values():
                nursery.start_soon(process.supervise)
            with trio.move_on_after(limit) as scope:
                await main()
            if scope.cancelled_caught:
                self.violation(f"the run did not end within {limit:g} simulated seconds")
            self.stopping = True
            for process in self.processes.values():
                process.restart()
            nursery.cancel_scope.cancel()

    async def chaos(self, nodes: list[Any], until: float) -> None:
        """Crashes, partitions, full disks and bit rot, as Poisson arrivals, until `until`."""
        f = self.faults
        step = 0.1
        while trio.current_time() < until:
            await trio.sleep(step)
            if self.disks is not None:
                self.disks.tick()
            for process in list(self.processes.values()):
                if process.up and process.crashable and self.rng.random() < f.crash_rate * step:
                    self.count(f"crash {type(process).__name__}")
                    self.crash(process)
            if self.rng.random() < f.partition_rate * step:
                names = sorted(n for n, p in self.processes.items() if p.partitionable)
                a, b = self.rng.sample(names, 2)
                how = "blackhole" if self.rng.random() < f.blackhole else "refuse"
                self.cut[frozenset((a, b))] = (
                    trio.current_time() + self.rng.uniform(*f.partition_for), how)
                self.count("partition")
                self.log(f"CUT {a}<->{b} ({how})")
            if nodes and self.rng.random() < f.disk_full_rate * step:
                node = self.rng.choice(nodes)
                node.fill_disk(self.rng.uniform(*f.disk_full_for))
                self.count("disk full")
            if nodes and self.rng.random() < f.bitrot_rate * step:
                node = self.rng.choice(nodes)
                if node.rot_a_byte(self.rng):
                    self.count("bitrot")

    def quiesce(self) -> None:
        """No new faults; every link heals; every crashed process comes back."""
        self.calm = True
        self.cut.clear()
        if self.disks is not None:
            self.disks.heal()
        for process in self.processes.values():
            process.restart()
