"""`python -m dfs.sim` (scripts/simulate): run many seeds, or replay one with its trace."""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console
from rich.progress import Progress

from dfs.sim.run import BUGS, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__)
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed and print its trace")
    parser.add_argument("--duration", type=float, default=20.0, help="simulated seconds of load")
    parser.add_argument("--bug", choices=BUGS, help="plant a bug (to see the simulator find it)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    err = Console(stderr=True)

    if args.seed is not None:
        result = simulate(args.seed, duration=args.duration, bug=args.bug)
        if args.json:
            print(json.dumps({"seed": result.seed, "violations": result.violations,
                              "outcomes": result.outcomes(), "faults": result.faults,
                              "trace_sha256": result.trace_digest()}))
        else:
            print("\n".join(result.trace))
            print(f"seed {result.seed}: outcomes {result.outcomes()}, faults {result.faults}")
            for v in result.violations:
                print("VIOLATION", v)
        return 0 if result.ok else 3

    failing: list[dict] = []
    sim_seconds = 0.0
    started = time.perf_counter()
    seeds = range(args.start, args.start + args.seeds)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("simulating", total=len(seeds))
        for seed in seeds:
            result = simulate(seed, duration=args.duration, bug=args.bug)
            sim_seconds += result.sim_seconds
            if not result.ok:
                failing.append({"seed": seed, "violations": result.violations[:5],
                                "replay": f"scripts/simulate --seed {seed}"
                                          + (f" --bug {args.bug}" if args.bug else "")})
            progress.advance(task)
    wall = time.perf_counter() - started
    summary = {"seeds": len(seeds), "failing": failing, "wall_s": round(wall, 2),
               "seeds_per_s": round(len(seeds) / wall, 1),
               "simulated_hours": round(sim_seconds / 3600, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(seeds)} seeds in {wall:.1f} s ({summary['seeds_per_s']} seeds/s), "
              f"{summary['simulated_hours']} simulated hours, {len(failing)} failing")
        for f in failing:
            print(f"  seed {f['seed']}: {f['violations'][0]}\n    replay: {f['replay']}")
    return 3 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
