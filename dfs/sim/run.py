"""One simulated run: build a cluster, let clients and faults loose, quiesce, check I1–I3."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dfs.sim.client import History, SimClient
from dfs.sim.coordinator import SimCoordinator
from dfs.sim.node import SimNode
from dfs.sim.world import Faults, World

BUGS = ("unforced_decision", "vote_before_force")


@dataclass
class Result:
    seed: int
    violations: list[str]
    history: History
    faults: dict[str, int]
    trace: list[str] = field(repr=False)
    sim_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def trace_digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.history.writes:
            counts[op.outcome] = counts.get(op.outcome, 0) + 1
        return counts


def simulate(seed: int, *, nodes: int = 3, replicas: int = 3, clients: int = 3,
             files: int = 2, duration: float = 20.0, faults: Faults | None = None,
             bug: str | None = None) -> Result:
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown planted bug {bug!r}")
    world = World(seed, faults or Faults())
    inos = list(range(2, 2 + files))
    node_names = {i: f"n{i}" for i in range(1, nodes + 1)}
    coord = SimCoordinator(world, node_names, replicas, inos,
                           bug=bug if bug == "unforced_decision" else None)
    world.add(coord)
    sim_nodes = {i: SimNode(world, name, i, bug=bug if bug == "vote_before_force" else None)
                 for i, name in node_names.items()}
    for node in sim_nodes.values():
        world.add(node)
    history = History()
    sim_clients = [SimClient(world, f"c{i}", inos, history) for i in range(1, clients + 1)]
    for client in sim_clients:
        world.add(client)

    world.run_until(duration)
    for client in sim_clients:
        client.running = False
    world.quiesce()
    world.run_until(duration + 60.0)  # > staged timeout: every leftover must be resolved
    violations = check(coord, sim_nodes, history)
    return Result(seed, violations, history, dict(world.faults_injected), world.trace, world.now)


def check(coord: SimCoordinator, nodes: dict[int, SimNode], history: History) -> list[str]:
    """The invariants of DESIGN.md §9 over the quiesced cluster."""
    v: list[str] = list(history.bad_reads)  # I1: no read returned bytes of another version
    committed = {key[1]: coord.disk.get(key) for key in coord.disk.keys() if key[0] == "txn"}
    for txid in coord.ledger:
        if txid not in committed:
            v.append(f"I2: the decision to commit txid={txid} was lost (decisions never change)")
    for op in history.writes:
        if op.outcome == "ok" and op.txid not in committed:
            v.append(f"I2: write txid={op.txid} to ino={op.ino} was acknowledged but is lost")
        if op.outcome == "failed" and op.txid in committed:
            v.append(f"I1: write txid={op.txid} failed for the client but committed")
    current = {}
    for key in coord.disk.keys():
        if key[0] == "inode":
            inode = coord.disk.get(key)
            current[inode["blob"]] = key[1]
            if inode["blob"] is not None and inode["blob"] not in committed:
                v.append(f"I1: ino={key[1]} points at uncommitted blob {inode['blob']}")
    for txid, rec in committed.items():
        op = history.by_txid.get(txid)
        for r in rec["replicas"]:
            state = nodes[r].stored(txid)
            if txid in current and state != "COMMITTED":
                v.append(f"I1: current txid={txid} of ino={rec['ino']} is {state} on n{r}")
            elif state is not None and op is not None and nodes[r].content(txid) != op.content:
                v.append(f"I1: committed txid={txid} has other bytes on replica n{r}")
    gc_left = [key for key in coord.disk.keys() if key[0] == "gc"]
    if gc_left:
        v.append(f"I3: {len(gc_left)} GC deletions never delivered, e.g. {gc_left[0]}")
    for r, node in nodes.items():
        for txid, rec in node.blobs().items():
            if rec["state"] != "COMMITTED":
                v.append(f"I3: {rec['state']} leftover txid={txid} on n{r}")
            elif txid not in committed:
                v.append(f"I1: txid={txid} COMMITTED on n{r} but never decided")
            elif txid not in current:
                v.append(f"I3: superseded txid={txid} still on n{r} after GC")
    return v
