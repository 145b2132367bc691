"""`python -m dfs.nemesis` (scripts/nemesis): run one fault campaign and print its summary.

Exit status 0 only when the campaign found no violation; 1 otherwise (the history file and the
processes' logs are kept, and their paths printed); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from dfs.nemesis.campaign import Options, Summary, campaign
from dfs.nemesis.cluster import GC_GRACE, TXN_RETENTION
from dfs.nemesis.faults import KINDS


def parse_args(argv: list[str] | None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(
        prog="scripts/nemesis",
        description="a fault campaign on a real loopback cluster (coordinator + 4 nodes, R=3, "
                    "two FUSE mounts): writers and readers while processes are killed, paused, "
                    "partitioned, slowed, filled up, bit-flipped, drained and removed, mounts "
                    "and writers killed and stopped, with repairs running; then heal, judge "
                    "the history and every version the mount writers left, judge the first "
                    "check, repair, check")
    parser.add_argument("--duration", type=float, default=60.0, metavar="S",
                        help="seconds of faults and load (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--dir", type=Path, default=None,
                        help="run directory (default: a new one under $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the cluster's data even when the campaign passes")
    parser.add_argument("--no-mount", action="store_true", help="no FUSE mount workers")
    parser.add_argument("--shape-writers", type=int, default=2, metavar="N",
                        help="workers writing every shape of writer on the mount, judged by "
                             "the versions they leave, with a reader on a second mount "
                             "(default 2; 0: none, and no second mount)")
    parser.add_argument("--ha", action="store_true",
                        help="metadata on three etcd members, two coordinators (standby "
                             "takeover); adds the leader and etcd faults")
    parser.add_argument("--faults", default=",".join(KINDS),
                        help=f"fault kinds to inject (default all: {','.join(KINDS)})")
    parser.add_argument("--strict-exits", action="store_true",
                        help="with --ha: a coordinator that exits by itself is a violation "
                             "(by default it is restarted and counted)")
    parser.add_argument("--cover", action="store_true",
                        help="inject each fault kind once first, then draw at random")
    parser.add_argument("--max-faults", type=int, default=2, help="faults at once (default 2)")
    parser.add_argument("--writers", type=int, default=3, help="library writers (default 3)")
    parser.add_argument("--readers", type=int, default=2, help="library readers (default 2)")
    parser.add_argument("--no-repairs", action="store_true",
                        help="no `dfs check --deep --repair` runs during the faults")
    parser.add_argument("--gc-grace", type=float, default=GC_GRACE, metavar="S",
                        help=f"the coordinator's GC grace (default {GC_GRACE:g})")
    parser.add_argument("--txn-retention", type=float, default=TXN_RETENTION, metavar="S",
                        help=f"the coordinator's ended-txn retention (default {TXN_RETENTION:g})")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or args.duration <= 0 or args.shape_writers < 0:
        parser.error(f"unknown fault kinds {unknown}" if unknown else "--duration must be > 0"
                     if args.duration <= 0 else "--shape-writers must be >= 0")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    root = args.dir or Path(tempfile.gettempdir()) / f"dfs-nemesis-{seed}-{os.getpid()}"
    return Options(duration=args.duration, seed=seed, root=root, mount=not args.no_mount,
                   shape_writers=args.shape_writers,
                   kinds=kinds, max_faults=args.max_faults, lib_writers=args.writers,
                   lib_readers=args.readers, keep=args.keep, repairs=not args.no_repairs,
                   gc_grace=args.gc_grace, txn_retention=args.txn_retention,
                   ha=args.ha, cover=args.cover, strict_exits=args.strict_exits), args.json


def render(summary: Summary, console: Console) -> None:
    ops = Table(title=f"operations (seed {summary.seed}, {summary.duration:g} s of faults, "
                      f"{summary.wall:.0f} s in all)")
    for column in ("op", "via", "ok", "fail", "info", "incomplete"):
        ops.add_column(column, justify="left" if column in ("op", "via") else "right")
    kinds = sorted({tuple(k.split()[:2]) for k in summary.ops})
    for f, via in kinds:
        ops.add_row(f, via, *(str(summary.ops.get(f"{f} {via} {o}", 0))
                              for o in ("ok", "fail", "info", "incomplete")))
    console.print(ops)
    faults = Table(title="faults injected")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    for kind, count in sorted(summary.faults.items()):
        faults.add_row(kind, str(count))
    for detail, count in sorted(summary.fault_details.items()):
        faults.add_row(f"  {detail}", str(count), style="dim")
    console.print(faults)
    if summary.takeovers:
        took = sorted(summary.takeovers)
        console.print(f"leader takeovers: {len(took)}, median {took[len(took) // 2]:.1f} s, "
                      f"worst {took[-1]:.1f} s")
    console.print(f"healed at the end: {', '.join(summary.healed) or 'nothing left to heal'}")
    if summary.mount_writers:
        console.print(f"mount writers, judged by their versions: {summary.mount_writers['line']}")
    if summary.repairs:
        console.print("found by the repairs under faults: " + ", ".join(
            f"{kind} {count}" for kind, count in summary.repairs.items()))
    console.print(f"settle: {summary.settled}")
    console.print("judged findings: " + (", ".join(
        f"{kind} {count}" for kind, count in summary.explained.items()) or "none"))
    for f in summary.judged:
        if f.get("explained_by"):
            console.print(f"  [dim]{f.get('kind')} {f.get('node_name') or f.get('node')} "
                          f"blob {f.get('blob')}: {f['explained_by']}[/]")
    console.print(f"dfs check: {summary.checker}")
    for item in summary.unrepaired:
        console.print(f"[yellow]unrepaired injected damage[/]: {item}")
    for item in summary.fault_errors:
        console.print(f"[red]fault error[/]: {item}")
    if summary.error:
        console.print(f"[red]campaign error[/]: {summary.error}")
    style = "green" if not summary.violations else "red"
    console.print(f"[{style}]invariant violations: {len(summary.violations)}[/]")
    for v in summary.violations[:50]:
        console.print(f"  [red]{v.kind}[/] {v.file}: {v.msg}")
    console.print(f"history: {summary.history}" + ("" if summary.passed
                                                  else f"  (logs in {summary.root})"))


def main(argv: list[str] | None = None) -> int:
    options, as_json = parse_args(argv)
    summary = trio.run(campaign, options)
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        render(summary, Console())
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
