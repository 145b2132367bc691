"""One fault campaign, start to finish: cluster up, workload and nemesis together for a bounded
time, heal, settle, judge the history and the versions the mount load left, judge the first
check against the nemesis's ledger, repair, judge again. Everything it starts it stops, by
pid, and unmounts.

The result is a `Summary`: operations by kind and outcome, faults by kind, every violation (a
campaign passes only with none), and where the history and the logs are.
"""

from __future__ import annotations

import random
import shutil
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dfs.nemesis.checker import Violation, check_history
from dfs.nemesis.cluster import GC_GRACE, TXN_RETENTION, NemesisCluster
from dfs.nemesis.faults import KINDS, Nemesis
from dfs.nemesis.final import (
    FinalReport,
    check_files,
    judge_then_repair,
    settle,
    wait_no_orphans,
)
from dfs.nemesis.history import History
from dfs.nemesis.mount_ends import MountEnds
from dfs.nemesis.mount_load import (
    AFTER_CLOSE,
    CLOSE_UNREPORTED,
    JUDGED_BY_VERSIONS,
    WRITE_VIA,
    MountLoad,
)
from dfs.nemesis.proxy import Proxies
from dfs.nemesis.workload import OP_TIMEOUT, Workload

SETUP_TIMEOUT = 120.0
FINISH_TIMEOUT = 600.0  # heal, recover, repair and judge


@dataclass
class Options:
    duration: float = 60.0
    seed: int = 0
    root: Path = Path("/tmp/dfs-nemesis")
    nodes: int = 4
    replicas: int = 3
    files: int = 6
    cold_files: int = 2
    lib_writers: int = 3
    lib_readers: int = 2
    mount: bool = True
    shape_writers: int = 2  # the mount load's workers (0: no mount load, no second mount)
    max_faults: int = 2
    kinds: tuple[str, ...] = KINDS
    keep: bool = False
    repairs: bool = True  # `dfs check --deep --repair` now and then, under the faults
    gc_grace: float = GC_GRACE
    txn_retention: float = TXN_RETENTION
    ha: bool = False  # metadata on three etcd members, two coordinators (issue 10)
    cover: bool = False  # each fault kind once before the random draws
    strict_exits: bool = False  # HA: a coordinator exiting by itself is a violation


@dataclass
class Summary:
    seed: int
    duration: float
    wall: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)  # "write lib ok" -> count
    faults: Counter[str] = field(default_factory=Counter)
    fault_details: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    healed: list[str] = field(default_factory=list)
    checker: str = "not run"
    settled: str = ""
    judged: list[dict[str, Any]] = field(default_factory=list)
    explained: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)  # mid-campaign repair findings
    unrepaired: list[str] = field(default_factory=list)
    corrupted: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    history: str = ""
    root: str = ""
    error: str | None = None
    fault_errors: list[str] = field(default_factory=list)
    takeovers: list[float] = field(default_factory=list)  # HA: seconds until a new leader
    mount_writers: dict[str, Any] = field(default_factory=dict)  # the mount load's figures

    @property
    def passed(self) -> bool:
        return not self.violations and self.error is None and not self.fault_errors

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "seed": self.seed, "duration_s": self.duration,
            "wall_s": round(self.wall, 1), "ops": dict(sorted(self.ops.items())),
            "faults": dict(sorted(self.faults.items())),
            "fault_details": dict(sorted(self.fault_details.items())),
            "violations": [v.to_json() for v in self.violations],
            "healed": self.healed, "settled": self.settled, "checker": self.checker,
            "explained": self.explained, "judged": self.judged, "repairs": self.repairs,
            "unrepaired": self.unrepaired,
            "corrupted": self.corrupted, "files": self.files, "history": self.history,
            "dir": self.root, "error": self.error, "fault_errors": self.fault_errors,
            "takeovers": self.takeovers, "mount_writers": self.mount_writers,
        }


async def campaign(opts: Options) -> Summary:
    """Run one campaign; never raises for what the system under test does (that's a result)."""
    started = time.monotonic()
    root = Path(opts.root)
    root.mkdir(parents=True, exist_ok=True)
    history = History(root / "history.jsonl", opts.seed)
    summary = Summary(opts.seed, opts.duration, history=str(history.path), root=str(root))
    rng = random.Random(opts.seed)
    proxies = Proxies()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxies.run)
            cluster = NemesisCluster(root, proxies, nodes=opts.nodes, replicas=opts.replicas,
                                     mount=opts.mount, gc_grace=opts.gc_grace,
                                     txn_retention=opts.txn_retention, ha=opts.ha,
                                     reader_mount=opts.shape_writers > 0)
            try:
                await _campaign(opts, cluster, history, rng, summary)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(60):
                    await cluster.stop_all()
                nursery.cancel_scope.cancel()
    except Exception as e:  # noqa: BLE001 - reported as the campaign's error, with the logs
        leaf = _leaf(e)
        summary.error = f"{type(leaf).__name__}: {leaf}"
        trace = "".join(traceback.format_exception(e))
        (root / "error.txt").write_text(trace)
        history.note("campaign error", error=summary.error, traceback=trace)
    finally:
        history.close()
    summary.wall = time.monotonic() - started
    _write_summary(summary, root)
    if summary.passed and not opts.keep:
        for path in root.iterdir():
            if path.is_dir() and path.name not in ("mnt", "mnt-r"):
                shutil.rmtree(path, ignore_errors=True)
    return summary


async def _campaign(opts: Options, cluster: NemesisCluster, history: History,
                    rng: random.Random, summary: Summary) -> None:
    with trio.fail_after(SETUP_TIMEOUT):
        await cluster.start()
        workload = Workload(cluster, history, opts.seed,
                            files=[f"f{i}" for i in range(opts.files)],
                            cold=[f"cold{i}" for i in range(opts.cold_files)])
        if opts.mount and opts.shape_writers > 0:
            workload.shapes = MountLoad(cluster, history, opts.seed, writers=opts.shape_writers,
                                        timeout=OP_TIMEOUT)
        await workload.setup()
    nemesis = Nemesis(cluster, history, rng, max_active=opts.max_faults, kinds=opts.kinds,
                      mount=opts.mount, cover=opts.cover, strict_exits=opts.strict_exits,
                      load=workload.shapes)
    history.note("campaign start", duration=opts.duration, seed=opts.seed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workload.run, opts.lib_writers, opts.lib_readers, opts.mount,
                               opts.repairs)
            await nemesis.run(opts.duration)
            workload.stop()  # in-flight ops finish within their own deadline
            nursery.cancel_scope.deadline = trio.current_time() + OP_TIMEOUT + 15
    finally:
        summary.faults = nemesis.counts  # the same counters: the last bit flip adds to them
        summary.fault_details = nemesis.details
        summary.corrupted = nemesis.corrupted
        summary.fault_errors = nemesis.errors
        summary.takeovers = nemesis.takeovers
        nemesis.details.update(cluster.notes)
        if cluster.start_errors:
            history.note("coordinator start errors", errors=cluster.start_errors)
    history.note("campaign end; healing")
    report = FinalReport()
    with trio.fail_after(FINISH_TIMEOUT):
        if "bitflip" in opts.kinds:
            await nemesis.last_bitflip(await workload.current_blobs())
        summary.healed = await nemesis.heal_everything()
        await settle(cluster, workload, report)
        ends = MountEnds.read(cluster.mount_log(), history)
        if opts.mount:  # which unfinished mount writes certainly did not commit
            shapes = workload.shapes.inos if workload.shapes is not None else {}
            ends.classify(history, frozenset({"mount", WRITE_VIA}), {**workload.inos, **shapes},
                        AFTER_CLOSE, CLOSE_UNREPORTED)
        summary.violations += check_history(history, skip=JUDGED_BY_VERSIONS)
        if workload.shapes is not None:
            async with cluster.client(via="") as client:
                found, summary.mount_writers = await workload.shapes.judge(client, ends)
            summary.violations += found
        summary.violations += [
            Violation("unexpected-error", history.ops[op_id].file,
                      f"op {op_id} raised {trace.strip().splitlines()[-1]} (not a DfsError; "
                      "traceback in the history)", [op_id])
            for op_id, trace in workload.unexpected]
        await judge_then_repair(cluster, nemesis.ledger, report)
        await check_files(cluster, workload, history, nemesis.corrupted, report)
        await wait_no_orphans(cluster, workload, report)
    summary.violations += nemesis.findings
    summary.violations += report.violations
    summary.corrupted = nemesis.corrupted  # with the last bit flip
    summary.checker = report.checker
    summary.settled = report.settled
    summary.judged = report.judged
    summary.explained = report.explained
    summary.repairs = dict(sorted(workload.repair_found.items()))
    summary.unrepaired = report.unrepaired
    summary.files = report.files
    if report.checker_output:
        history.note("checker", output=report.checker_output)
    for op in history.ops.values():
        if op.process != "final":
            summary.ops[f"{op.f} {op.via} {op.outcome or 'incomplete'}"] += 1


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _write_summary(summary: Summary, root: Path) -> None:
    import json

    (root / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
