"""scripts/bench-snapshot: how long `dfs snapshot create` takes on N files, and how long
writers elsewhere wait meanwhile (issue: "seconds, not minutes; no stall beyond one group
commit").

A fresh local cluster (coordinator + 3 nodes) whose coordinator metadata is seeded with N files
in directories of 1,000 before it starts (their blobs are not on the nodes: a snapshot copies
metadata only, so it does not matter, and seeding takes seconds where writing 10^5 files would
take many minutes). Writers then commit 4 KiB files into /w through the library, and the
snapshot of /seed is taken in the middle; each write's latency is kept, so the figures say
what the writers saw before and during the snapshot.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from dfs.checker.bench import LocalCluster
from dfs.client import Client
from dfs.meta import ROOT_INO, MetaStore
from dfs.rpc import load_secret

PER_DIR = 1000
CHECKSUM = b"\x01" * 16


def seed(data: Path, files: int) -> float:
    started = time.monotonic()
    store = MetaStore.open(data, map_size=1 << 33)
    ns = store.namespace

    def fill(txn: Any) -> None:
        top = ns.mkdir(txn, ROOT_INO, b"seed", 0o755, 0, 0, 1)["ino"]
        directory = 0
        for i in range(files):
            if i % PER_DIR == 0:
                directory = ns.mkdir(txn, top, f"d{i // PER_DIR}".encode(), 0o755, 0, 0, 1)["ino"]
            ino = ns.create(txn, directory, f"f{i}".encode(), 0o644, 0, 0, 1)["ino"]
            ns.install_version(txn, ino, 10**9 + i, base_version=None, if_version=False,
                               size=4096, checksum=CHECKSUM, replicas=[1, 2, 3],
                               mtime_ns=1, now_ns=1)

    store.db.write_now(fill)
    store.close()
    return time.monotonic() - started


async def measure(cluster: LocalCluster, writers: int, before: float) -> dict[str, Any]:
    secret = load_secret(str(cluster.secret))
    latencies: list[tuple[float, float]] = []  # (start, seconds)
    window: dict[str, float] = {}
    async with Client(cluster.address, secret) as client:
        root = await client.resolve("/")
        w = await client.mkdir(root.ino, b"w", 0o755, 0, 0)
        stop = trio.Event()

        async def writer(k: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                began = time.monotonic()
                attr = await client.create(w.ino, f"w{k}-{n}".encode(), 0o644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(b"x" * 4096))
                latencies.append((began, time.monotonic() - began))

        async with trio.open_nursery() as nursery:
            for k in range(writers):
                nursery.start_soon(writer, k)
            await trio.sleep(before)
            window["start"] = time.monotonic()
            reply = await client.snapshot_create("/seed", b"bench")
            window["end"] = time.monotonic()
            await trio.sleep(before)
            stop.set()
    during = [s for t, s in latencies if window["start"] <= t + s and t <= window["end"]]
    outside = [s for t, s in latencies if t + s < window["start"] or t > window["end"]]
    return {"snapshot": reply["snapshot"], "seconds": reply["seconds"],
            "read_seconds": reply["read_seconds"], "pieces": reply["pieces"],
            "writes_during": len(during), "write_max_during_s": round(max(during, default=0), 4),
            "write_p50_during_s": round(statistics.median(during), 4) if during else None,
            "write_max_outside_s": round(max(outside, default=0), 4),
            "write_p50_outside_s": round(statistics.median(outside), 4) if outside else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-snapshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfs-bench-snapshot-") as tmp:
        root = Path(tmp)
        print(f"seeding {args.files} files...", file=sys.stderr)
        seeded = seed(root / "coordinator", args.files)
        cluster = LocalCluster(root, 3)
        try:
            cluster.start()
            out = trio.run(measure, cluster, args.writers, 3.0)
        finally:
            cluster.stop()
    out["files"], out["seed_seconds"] = args.files, round(seeded, 1)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"snapshot of {args.files} files: {out['seconds']:.2f} s (read "
              f"{out['read_seconds']:.2f} s, {out['pieces']} pieces)\n"
              f"4 KiB writes elsewhere during it: {out['writes_during']}, median "
              f"{out['write_p50_during_s']} s, max {out['write_max_during_s']} s; outside it: "
              f"median {out['write_p50_outside_s']} s, max {out['write_max_outside_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
