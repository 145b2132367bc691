"""The simulated world: virtual time, one seeded random source, a lossy network.

Everything random comes from `World.rng`; events run in (time, sequence) order, so one seed gives
one trace, byte for byte.
"""

from __future__ import annotations

import abc
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    """How hostile the run is. Probabilities are per message or per step."""

    drop: float = 0.02
    duplicate: float = 0.03
    max_delay: float = 0.05  # seconds; reordering comes from random delays
    crash: float = 0.0005  # per process per step of a running process
    crash_point: float = 0.01  # at a failpoint (DESIGN.md §8) inside a handler
    disk_full: float = 0.002  # chance per step that a node's disk fills up for a while
    disk_full_for: tuple[float, float] = (0.5, 4.0)
    restart_after: tuple[float, float] = (0.1, 3.0)
    partition: float = 0.002  # chance per step that a random link is cut for a while
    partition_for: tuple[float, float] = (0.5, 5.0)


NO_FAULTS = Faults(drop=0, duplicate=0, crash=0, partition=0, crash_point=0, disk_full=0)


class Crashed(Exception):
    """Raised at a crash point: the rest of the handler never runs."""


class Process(abc.ABC):
    """A simulated process: receives messages while up; a crash wipes its memory."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.up = True
        self.incarnation = 0

    @abc.abstractmethod
    def receive(self, src: str, msg: dict[str, Any]) -> None: ...

    def crash(self) -> None:
        self.up = False
        self.incarnation += 1

    def restart(self) -> None:
        self.up = True

    def send(self, dst: str, msg: dict[str, Any]) -> None:
        self.world.send(self.name, dst, msg)

    def crash_point(self, name: str) -> None:
        """A failpoint: the world may crash this process right here, mid-handler."""
        w = self.world
        if not w.calm and w.rng.random() < w.faults.crash_point:
            w.count(f"crash at {name}")
            w.log(f"CRASH {self.name} at {name}")
            w.crash(self)
            raise Crashed(name)

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        """A timer of this incarnation: it does not fire after a crash."""
        inc = self.incarnation

        def fire() -> None:
            if self.up and self.incarnation == inc:
                fn(*args)

        self.world.at(delay, fire)


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    fn: Callable[[], None] = field(compare=False)


class World:
    def __init__(self, seed: int, faults: Faults) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.now = 0.0
        self._seq = 0
        self._queue: list[_Event] = []
        self.processes: dict[str, Process] = {}
        self.cut: dict[frozenset[str], float] = {}  # link -> healed at
        self.trace: list[str] = []
        self.faults_injected: dict[str, int] = {}
        self.calm = False  # once set: no new faults, cut links heal, crashed processes return

    def add(self, process: Process) -> None:
        self.processes[process.name] = process

    def log(self, text: str) -> None:
        self.trace.append(f"{self.now:10.4f} {text}")

    def count(self, fault: str) -> None:
        self.faults_injected[fault] = self.faults_injected.get(fault, 0) + 1

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Event(self.now + delay, self._seq, fn))

    # ---------------------------------------------------------------- network

    def send(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        what = msg.get("op") or msg.get("re")
        link = frozenset((src, dst))
        if link in self.cut and self.cut[link] > self.now:
            self.log(f"cut  {src}->{dst} {what}")
            return
        if not self.calm and self.rng.random() < self.faults.drop:
            self.count("drop")
            self.log(f"drop {src}->{dst} {what}")
            return
        copies = 1
        if not self.calm and self.rng.random() < self.faults.duplicate:
            self.count("duplicate")
            copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(0.0005, self.faults.max_delay)
            self.at(delay, lambda m=dict(msg): self._deliver(src, dst, m))

    def _deliver(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        process = self.processes[dst]
        if not process.up:
            return
        self.log(f"recv {src}->{dst} {msg.get('op') or msg.get('re')} {msg.get('txid', '')}")
        process.receive(src, msg)
        self._maybe_fault()

    # ---------------------------------------------------------------- faults

    def _maybe_fault(self) -> None:
        if self.calm:
            return
        f = self.faults
        for process in self.processes.values():
            if process.up and getattr(process, "crashable", True) and self.rng.random() < f.crash:
                self.count(f"crash {type(process).__name__}")
                self.log(f"CRASH {process.name}")
                self.crash(process)
        if self.rng.random() < f.disk_full:
            nodes = [p for p in self.processes.values() if hasattr(p, "full_until")]
            if nodes:
                node = self.rng.choice(nodes)
                node.full_until = self.now + self.rng.uniform(*f.disk_full_for)
                self.count("disk full")
                self.log(f"DISK FULL {node.name}")
        if self.rng.random() < f.partition:
            names = sorted(self.processes)
            a, b = self.rng.sample(names, 2)
            self.cut[frozenset((a, b))] = self.now + self.rng.uniform(*f.partition_for)
            self.count("partition")
            self.log(f"CUT {a}<->{b}")

    def crash(self, process: Process) -> None:
        process.crash()
        self.at(self.rng.uniform(*self.faults.restart_after), lambda: self._restart(process))

    def _restart(self, process: Process) -> None:
        if not process.up:
            self.log(f"RESTART {process.name}")
            process.restart()

    def quiesce(self) -> None:
        """Stop injecting faults; heal every link; bring every crashed process back."""
        self.calm = True
        self.cut.clear()
        for process in self.processes.values():
            if hasattr(process, "full_until"):
                process.full_until = 0.0
        for process in self.processes.values():
            self._restart(process)

    # ---------------------------------------------------------------- run

    def run_until(self, t: float) -> None:
        while self._queue and self._queue[0].time <= t:
            event = heapq.heappop(self._queue)
            self.now = event.time
            try:
                event.fn()
            except Crashed:
                pass
        self.now = max(self.now, t)
