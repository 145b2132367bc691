"""Deterministic simulation of 2PC with the real state machines (DESIGN.md §10.2)."""

from __future__ import annotations

import pytest

from dfs import failpoints
from dfs.sim.run import BUGS, simulate
from dfs.sim.world import NO_FAULTS


def test_many_seeds_keep_every_invariant() -> None:
    ok_writes = reads = 0
    faults: dict[str, int] = {}
    for seed in range(200):
        result = simulate(seed)
        assert result.ok, f"seed {seed}: {result.violations[:5]} (replay: scripts/simulate --seed {seed})"
        ok_writes += result.outcomes().get("ok", 0)
        reads += result.history.reads
        for kind, n in result.faults.items():
            faults[kind] = faults.get(kind, 0) + n
    # The runs must have exercised something: writes that landed, reads, and every fault kind.
    assert ok_writes > 500 and reads > 200
    kinds = ["drop", "duplicate", "partition", "disk full", "crash SimNode",
             "crash SimCoordinator", *(f"crash at {name}" for name in sorted(failpoints.NAMES))]
    for kind in kinds:
        assert faults.get(kind, 0) > 0, f"no {kind} injected in 200 seeds"


def test_same_seed_same_trace_byte_for_byte() -> None:
    a, b, c = simulate(42), simulate(42), simulate(43)
    assert a.trace == b.trace and a.trace_digest() == b.trace_digest()
    assert a.trace_digest() != c.trace_digest()


def test_without_faults_every_write_lands() -> None:
    result = simulate(7, faults=NO_FAULTS)
    assert result.ok
    outcomes = result.outcomes()
    assert outcomes.get("ok", 0) > 0
    # Without faults only if_version conflicts may fail a write.
    failed = [op for op in result.history.writes if op.outcome == "failed"]
    assert all(op.detail == "CONFLICT" for op in failed)


@pytest.mark.parametrize("bug", BUGS)
def test_simulator_finds_a_planted_bug(bug: str) -> None:
    found = [seed for seed in range(60) if not simulate(seed, bug=bug).ok]
    assert found, f"planted bug {bug!r} survived 60 seeds: the simulator has lost its power"
