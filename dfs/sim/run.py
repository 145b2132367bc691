"""One simulated run of the real servers: set up, load and faults, quiesce, judge, repair, check.

`simulate(seed)` is a pure function of its arguments: the same seed gives the same trace byte
for byte (tests/test_simulation.py holds it to that), so a failing seed replays with
`scripts/simulate --seed S`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from dfs import failpoints, rpc, runtime
from dfs.checker.run import run_check
from dfs.client import Client
from dfs.errors import DfsError
from dfs.sim import bugs as planted
from dfs.sim.disks import WorldDisks
from dfs.sim.invariants import check_history, check_state, destroyed, judge, removed_nodes
from dfs.sim.network import SimNetwork
from dfs.sim.processes import COORDINATOR, SECRET, SimCoordinator, SimNode, Timing
from dfs.sim.watch import Watcher
from dfs.sim.workload import ROOT, History, SimOperator, SimUser, describe
from dfs.sim.world import Faults, SimHost, SimProcess, World

SETTLE = 20.0  # simulated seconds after the faults stop before the judge looks
RUN_SLACK = 600.0  # simulated seconds past the load a run may take before it is a violation
WATCH_EVERY = 0.5  # rule 5 is checked over the log this often (dfs/sim/watch.py)
FILES = 3
GROUPERS = 3  # users whose every write is a multi-file transaction


@dataclass
class Result:
    seed: int
    violations: list[str]
    history: dict[str, Any]
    faults: dict[str, int]
    trace: list[str] = field(repr=False)
    sim_seconds: float = 0.0
    messages: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def trace_digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()


class Tester(SimProcess):
    """The scenario's own process: never crashed, never cut off."""

    crashable = False
    partitionable = False

    async def run(self) -> None:
        await trio.sleep_forever()


class _TraceHandler(logging.Handler):
    """Server warnings and errors go into the trace, stamped with virtual time."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        try:
            who = self.world.current().name
        except LookupError:
            who = "-"
        self.world.log(f"{who} {record.levelname} {record.name}: {record.getMessage()}")


def simulate(seed: int, *, duration: float = 20.0, nodes: int = 4, replicas: int = 3,
             writers: int = 3, readers: int = 2, faults: Faults | None = None,
             bug: str | None = None, timing: Timing | None = None,
             verbose: bool = False) -> Result:
    """One run; `verbose` puts every request and reply in the trace (for a replay)."""
    world = World(seed, faults or planted.faults_for(bug) or Faults())
    with planted.planted(bug), _seams(world, verbose) as (network, disks):
        trio.run(_scenario, world, network, disks, duration, nodes, replicas, writers,
                 readers, timing or Timing(),
                 clock=trio.testing.MockClock(autojump_threshold=0))
    return Result(seed, world.violations, world.summary, dict(world.faults_injected),
                  world.trace, world.sim_seconds, network.messages)


class _seams:
    """Install the simulated host, network, disks and failpoint hook; put production back."""

    def __init__(self, world: World, verbose: bool) -> None:
        self.world = world
        self.verbose = verbose

    def __enter__(self) -> tuple[SimNetwork, WorldDisks]:
        from dfs import db

        self.network = SimNetwork(self.world, verbose=self.verbose)
        self.disks = WorldDisks(self.world.rng)
        self._host = runtime.install(SimHost(random.Random(self.world.rng.random())))
        self._net = rpc.install_network(self.network)
        self._envs = db.install_environments(self.disks.model.open)
        failpoints.install_hook(self.world.crash_point)
        trio_run = trio._core._run
        self._deterministic = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
        trio_run._r.seed(self.world.seed)
        self._handler = _TraceHandler(self.world)
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self._handler)
        root.setLevel(logging.WARNING)
        return self.network, self.disks

    def __exit__(self, *exc: object) -> None:
        from dfs import db

        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(self._level)
        trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = self._deterministic  # type: ignore[misc]
        failpoints.install_hook(None)
        db.install_environments(self._envs)
        rpc.install_network(self._net)
        runtime.install(self._host)


async def _scenario(world: World, network: SimNetwork, disks: WorldDisks, duration: float,
                    n_nodes: int, replicas: int, writers: int, readers: int,
                    timing: Timing) -> None:
    world.disks = disks
    tester = Tester(world, "tester")
    coord = SimCoordinator(world, disks, replicas, timing)
    nodes = [SimNode(world, disks, i, timing) for i in range(1, n_nodes + 1)]
    history = History()
    for process in (tester, coord, *nodes):
        world.add(process)
    watcher = Watcher(world, disks.model)
    watcher.coord, watcher.nodes = coord, {n.name: n for n in nodes}
    network.watcher = watcher

    async def watch() -> None:
        while True:
            await trio.sleep(WATCH_EVERY)
            watcher.scan()
    world.summary = {}
    world.sim_seconds = 0.0

    async def main() -> None:
        world.enter(tester)
        world.spawn(watch)
        async with Client(COORDINATOR, SECRET, timeout=2.0, retry_for=30.0) as client:
            files = await _setup(client, n_nodes)
            until = trio.current_time() + duration
            users = [SimUser(world, f"w{i}", "writer", files, history, until)
                     for i in range(writers)]
            users += [SimUser(world, f"r{i}", "reader", files, history, until)
                      for i in range(readers)]
            users.append(SimUser(world, "churn", "churner", files, history, until))
            users += [SimUser(world, f"g{i}", "grouper", files, history, until)
                      for i in range(GROUPERS)]
            operator = SimOperator(world, nodes, history, until,
                                   remove_one=n_nodes > replicas)
            # Another client than the churner lists its files (seen before their content?).
            users.append(SimUser(world, "lister", "lister", files, history, until))
            for process in (*users, operator):
                world.add(process)
                world.spawn(process.supervise)
            await world.chaos(nodes, until)
            world.quiesce()
            await trio.sleep(SETTLE)
            first = await run_check(client, deep=True, repair=False)
            lost = destroyed(first, disks.rotted, removed_nodes(coord), replicas)
            if lost:
                world.log(f"DESTROYED by the world's faults: blobs {sorted(lost)}")
            for v in judge(first, disks.rotted, lost):
                world.violation(v)
            repaired = await run_check(client, deep=True, repair=True)
            for f in repaired.findings:
                world.log(f"repair: {f.kind.value} ino={f.ino} node={f.node} blob={f.blob}: "
                          f"fixed={f.fixed} {f.fix}")
            await trio.sleep(timing.gc_grace + 4 * timing.gc_interval + 2.0)
            for v in check_state(coord, nodes, replicas, lost):
                world.violation(v)
            read = {ino: await _content(client, ino) for ino in files}
            final = {ino: data for ino, (_, data) in read.items()}
            gone = {ino for ino, (blob, _) in read.items() if blob in lost}
            for v in check_history(history, final, gone):
                world.violation(v)
        world.summary = {**describe(history), "watched": watcher.checks}
        world.sim_seconds = trio.current_time()

    await world.run(main, limit=duration + RUN_SLACK)


async def _setup(client: Client, n_nodes: int) -> list[int]:
    """Wait for every node to register, then create the files the writers share (retried:
    messages are already being lost and processes crashed)."""
    while True:
        try:
            if len([n for n in await client.node_list() if n["state"] == "up"]) >= n_nodes:
                break
        except DfsError:
            pass
        await trio.sleep(0.2)
    files = []
    for i in range(FILES):
        name = f"f{i}".encode()
        while True:
            try:
                attr = await client.create(ROOT, name, 0o100644, 0, 0, exclusive=False)
                break
            except DfsError:
                await trio.sleep(0.2)
        files.append(attr.ino)
    return files


async def _content(client: Client, ino: int) -> tuple[int | None, bytes]:
    """A file's current blob and its bytes (or what made them unreadable)."""
    blob = None
    try:
        attr = await client.getattr(ino)
        blob = attr.blob
        sink = io.BytesIO()
        await client.read_file(attr, sink)
        return blob, sink.getvalue()
    except DfsError as e:
        return blob, f"<unreadable: {e.code.value}>".encode()
