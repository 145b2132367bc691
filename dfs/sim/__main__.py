"""`python -m dfs.sim` (scripts/simulate): the real servers under many seeds, or one replayed.

    scripts/simulate --seeds 1000 [--start S] [--jobs 2] [--json]
    scripts/simulate --seed S            # replay one seed: its whole trace, then the verdict
    scripts/simulate --seeds 50 --bug vote_before_force   # watch a planted bug being found
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from dfs.sim.bugs import BUGS
from dfs.sim.run import simulate

MAX_JOBS = 64


def _one(args: tuple[int, float, str | None]) -> dict[str, Any]:
    seed, duration, bug = args
    started = time.perf_counter()
    result = simulate(seed, duration=duration, bug=bug)
    return {"seed": seed, "ok": result.ok, "violations": result.violations[:5],
            "sim_seconds": result.sim_seconds, "wall_s": time.perf_counter() - started,
            "messages": result.messages, "history": result.history, "faults": result.faults}


def _replay(seed: int, duration: float, bug: str | None, as_json: bool, verbose: bool) -> int:
    result = simulate(seed, duration=duration, bug=bug, verbose=verbose)
    if as_json:
        print(json.dumps({"seed": seed, "ok": result.ok, "violations": result.violations,
                          "history": result.history, "faults": result.faults,
                          "messages": result.messages, "sim_seconds": result.sim_seconds,
                          "trace_sha256": result.trace_digest()}))
    else:
        print("\n".join(result.trace))
        print(f"seed {seed}: {result.history}\nfaults {result.faults}")
        for v in result.violations:
            print("VIOLATION", v)
        print("ok" if result.ok else f"{len(result.violations)} violations")
    return 0 if result.ok else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed and print its trace")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="simulated seconds of load and faults per seed (default 20)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (processes)")
    parser.add_argument("--bug", choices=BUGS, help="plant a bug (to see the simulator find it)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--verbose", action="store_true",
                        help="with --seed: every request and reply in the trace")
    args = parser.parse_args(argv)
    if args.seed is not None:
        return _replay(args.seed, args.duration, args.bug, args.json, args.verbose)
    if not 1 <= args.jobs <= MAX_JOBS or args.seeds < 1:
        parser.error(f"--jobs must be 1..{MAX_JOBS} and --seeds at least 1")

    err = Console(stderr=True)
    work = [(s, args.duration, args.bug) for s in range(args.start, args.start + args.seeds)]
    failing: list[dict[str, Any]] = []
    sim_seconds = messages = 0.0
    started = time.perf_counter()
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar, \
            multiprocessing.Pool(args.jobs) as pool:
        task = bar.add_task("simulating", total=len(work))
        for one in pool.imap_unordered(_one, work):
            sim_seconds += one["sim_seconds"]
            messages += one["messages"]
            if not one["ok"]:
                replay = f"scripts/simulate --seed {one['seed']}" + \
                    (f" --bug {args.bug}" if args.bug else "")
                failing.append({"seed": one["seed"], "violations": one["violations"],
                                "replay": replay})
            bar.advance(task)
    wall = time.perf_counter() - started
    failing.sort(key=lambda f: f["seed"])
    summary = {"seeds": len(work), "failing": failing, "wall_s": round(wall, 1),
               "seeds_per_s": round(len(work) / wall, 2), "jobs": args.jobs,
               "simulated_hours": round(sim_seconds / 3600, 2),
               "messages": int(messages), "bug": args.bug}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(work)} seeds in {wall:.1f} s ({summary['seeds_per_s']} seeds/s, "
              f"{args.jobs} jobs), {summary['simulated_hours']} simulated hours, "
              f"{int(messages)} messages, {len(failing)} failing")
        for f in failing:
            print(f"  seed {f['seed']}: {f['violations'][0]}\n    replay: {f['replay']}")
    return 3 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
