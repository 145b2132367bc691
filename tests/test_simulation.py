"""The simulator runs the real servers (dfs/sim, docs/design.md §10): invariants over many
seeds, determinism, and planted bugs in the real code found within a bounded number of seeds.

About two minutes in the default suite; `-m slow` (and scripts/simulate) run many more seeds.
"""

from __future__ import annotations

import pytest

from dfs import failpoints
from dfs.checker.findings import Finding, Kind
from dfs.checker.run import Report
from dfs.sim.bugs import BUGS, faults_for
from dfs.sim.invariants import destroyed, judge
from dfs.sim.run import simulate
from dfs.sim.world import NO_FAULTS

CI_SEEDS = range(1000, 1016)
BUG_SEEDS = 12  # every planted bug must be caught within this many seeds
# ... except where one seed catches it less often: a split group decision shows only to a
# group read between its two writes, in about 1 seed of 12 (10 of 120 measured from 3000, the
# first at 3049, after this stop's client and OUTCOME changes moved every schedule). 60 seeds
# miss it with a chance of about 0.5% for any one version of the code.
BUG_SEEDS_FOR = {"group_decision_split": 60}


def _run_seeds(seeds: range) -> dict[str, int]:
    faults: dict[str, int] = {}
    ok_writes = reads = 0
    for seed in seeds:
        result = simulate(seed)
        assert result.ok, (f"seed {seed}: {result.violations[:5]} "
                           f"(replay: scripts/simulate --seed {seed})")
        ok_writes += result.history["writes"].get("ok", 0)
        reads += result.history["reads"]
        for kind, n in result.faults.items():
            faults[kind] = faults.get(kind, 0) + n
    assert ok_writes > 20 * len(seeds) and reads > 20 * len(seeds)
    return faults


def test_many_seeds_keep_every_invariant() -> None:
    faults = _run_seeds(CI_SEEDS)
    # The runs must have met every kind of fault, crashes at the 2PC failpoints included.
    for kind in ("drop", "duplicate", "partition", "disk full", "bitrot", "crash SimNode",
                 "crash SimCoordinator", "crash SimUser", "crash_point"):
        assert faults.get(kind, 0) > 0, f"no {kind} injected in {len(CI_SEEDS)} seeds"
    hit = {name for name in failpoints.NAMES if faults.get(f"crash at {name}")}
    assert len(hit) >= len(failpoints.NAMES) - 1, f"crash points reached: {sorted(hit)}"


@pytest.mark.slow
def test_many_more_seeds_keep_every_invariant() -> None:
    _run_seeds(range(2000, 2200))


# Seeds that once failed on correct code, each for a reason since fixed: 1012 hung in wall
# time (a shielded write waited for a stopped database writer, dfs/db.py WriterStopped); 14
# flagged rule 5 while a repair re-made a rotted copy on its listed node (dfs/sim/watch.py);
# 8232 and 8345 left a removed node's copy unrepaired to the end: a repair target's fetch
# waited the peers' 30 s on a crashed source while holding the blob's lock, so every retry
# of the repair timed out behind it (fetch's `within_ms`, storage_node/maintenance.py).
# 40475 lost a snapshot's blob to the world itself (a rot, a node removed mid-drain, a rot of
# the last copy while its node was down): the judge counts such a loss as the faults' doing
# only when R copies were destroyed (invariants.destroyed, tested below).
FOUND_SEEDS = (1012, 14, 5475, 5538, 8232, 8345, 40475)


@pytest.mark.parametrize("seed", FOUND_SEEDS)
def test_seeds_that_once_failed_keep_every_invariant(seed: int) -> None:
    result = simulate(seed)
    assert result.ok, f"seed {seed}: {result.violations[:5]} (replay: scripts/simulate --seed {seed})"


def test_a_loss_is_the_worlds_doing_only_when_it_destroyed_r_copies() -> None:
    """Blob 7 listed on nodes 1, 2, 3 and lost: rotted on 1 and 2, and 3 removed, is the
    faults' doing (R=3 copies destroyed, each found bad by the check); with 3 removed but only
    1 rotted, the copy on 2 went bad by no fault of the world's (a bug), and every finding
    about it is reported."""
    def report(*findings: Finding) -> Report:
        return Report(path="/", deep=True, repair=False, findings=list(findings))

    lost = Finding(Kind.LOST, ino=4, blob=7)
    gone = Finding(Kind.MISSING, ino=4, node=3, blob=7, detail="node 3 is removed")
    bad1, bad2 = Finding(Kind.CORRUPT, ino=4, node=1, blob=7), \
        Finding(Kind.CORRUPT, ino=4, node=2, blob=7)
    assert destroyed(report(lost, gone, bad1, bad2), {(1, 7), (2, 7)}, {3}, 3) == {7}
    assert judge(report(lost, gone, bad1, bad2), {(1, 7), (2, 7)}, {7}) == []
    assert destroyed(report(lost, gone, bad1, bad2), {(1, 7)}, {3}, 3) == set()
    kept = judge(report(lost, gone, bad1, bad2), {(1, 7)}, set())
    assert [v.split()[2] for v in kept] == ["lost_file", "missing_replica", "corrupt_chunk"]
    assert destroyed(report(gone, bad1, bad2), {(1, 7), (2, 7)}, {3}, 3) == set()  # not lost
    # A rot the world made on a copy no longer listed (repaired away) is not counted.
    assert destroyed(report(lost, gone, bad2), {(1, 7), (2, 7)}, {3}, 3) == set()


def test_same_seed_same_trace_byte_for_byte() -> None:
    a, b, c = simulate(42, duration=8.0), simulate(42, duration=8.0), simulate(43, duration=8.0)
    assert a.trace == b.trace and a.trace_digest() == b.trace_digest()
    assert a.trace_digest() != c.trace_digest()


def test_without_faults_every_write_lands() -> None:
    result = simulate(7, faults=NO_FAULTS, duration=10.0)
    assert result.ok, result.violations
    writes = result.history["writes"]
    assert writes.get("ok", 0) > 50 and writes.get("info", 0) == 0
    # Without faults only conditional writes that lost the race may fail (CONFLICT).
    assert not result.faults


@pytest.mark.parametrize("bug", BUGS)
def test_simulator_finds_a_planted_bug_in_the_real_code(bug: str) -> None:
    """Each planted bug breaks one rule in the real classes; seeds where the correct code
    keeps every invariant must show a violation with the bug within BUG_SEEDS seeds."""
    faults = faults_for(bug)  # the same faults with and without the bug
    budget = BUG_SEEDS_FOR.get(bug, BUG_SEEDS)
    for seed in range(3000, 3000 + budget):
        if not simulate(seed, bug=bug).ok:
            assert simulate(seed, faults=faults).ok, f"seed {seed} fails without the bug too"
            return
    pytest.fail(f"planted bug {bug!r} survived {budget} seeds: the simulator lost its power")
