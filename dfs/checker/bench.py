"""scripts/bench-check: how long `dfs check` (and --deep) take on N files, and how fast a
removed node's replicas are re-made.

A fresh local cluster (coordinator + 4 nodes, R=3, loopback) in a tmp dir; N small files
written through the client library; then the real `dfs check --json` and `dfs check --deep
--json` are timed; then one node is killed and `dfs node remove` (which waits until every
replica it held has been re-made) is timed: files/s of re-replication.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

from dfs.cli.procs import DFS, Child

COORDINATOR_ARGS = ("--node-timeout", "1.5", "--gc-grace", "5")
NODE_ARGS = ("--heartbeat-interval", "0.2", "--scrub-rate", "0")
RESTART_WAIT = 900.0


class LocalCluster:
    def __init__(self, root: Path, nodes: int, meta: str = "lmdb") -> None:
        self.root = root
        self.meta = meta
        self.secret = root / "secret"
        self.secret.write_text(secrets.token_hex(32) + "\n")
        self.children: dict[str, Child] = {}
        self.nodes = nodes
        self.address = ""

    def start(self) -> None:
        common = ["--secret-file", str(self.secret)]
        meta: list[str] = []
        if self.meta == "etcd":  # three local members, as `dfs local up --ha` runs them
            from dfs.cli.etcd_members import LocalEtcd

            self.etcd = LocalEtcd(self.root, 3)
            self.etcd.start()
            meta = ["--meta", self.etcd.url]
        coordinator = Child("coordinator", [*DFS, *common, "coordinator", "--data",
                                            str(self.root / "coordinator"), "--listen",
                                            "127.0.0.1:0", *COORDINATOR_ARGS, *meta],
                            self.root / "coordinator.log")
        coordinator.start()
        self.children["coordinator"] = coordinator
        self.address = coordinator.wait_listening()
        for i in range(1, self.nodes + 1):
            child = Child(f"node-{i}", [*DFS, *common, "--coordinator", self.address, "node",
                                        "--data", str(self.root / f"node-{i}"), *NODE_ARGS],
                          self.root / f"node-{i}.log")
            child.start()
            child.wait_listening()
            self.children[child.name] = child
        deadline = time.monotonic() + 30
        while sum(n["state"] == "up" for n in self.status()["nodes"]) < self.nodes:
            if time.monotonic() > deadline:
                raise SystemExit("nodes did not come up")
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {**os.environ, "DFS_COORDINATOR": self.address,
                "DFS_SECRET_FILE": str(self.secret)}

    def dfs(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*DFS, *args], capture_output=True, env=self.env(),
                              timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.dfs("status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else {"nodes": []}

    def stop(self) -> None:
        for name in reversed(list(self.children)):
            self.children[name].stop(timeout=5)
        if getattr(self, "etcd", None) is not None:
            self.etcd.stop()


async def write_files(cluster: LocalCluster, count: int, size: int, writers: int) -> float:
    from dfs.client import Client
    from dfs.rpc import load_secret

    started = time.monotonic()
    async with Client(cluster.address, load_secret(cluster.secret)) as client:
        root = await client.resolve("/")
        directory = await client.mkdir(root.ino, b"bench", 0o755, 0, 0)
        todo = iter(range(count))

        async def writer() -> None:
            for i in todo:
                attr = await client.create(directory.ino, f"f{i:06d}".encode(), 0o100644, 0, 0)
                await client.write_file(attr.ino, io.BytesIO(os.urandom(size)))

        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(writer)
    return time.monotonic() - started


def seed(cluster: LocalCluster, count: int) -> float:
    """N files written straight into the stopped processes' LMDB (dfs/checker/seed.py); the
    cluster is started again on the same coordinator address."""
    from dfs.checker.seed import seed_coordinator, seed_node

    async def mkdir() -> int:
        from dfs.client import Client
        from dfs.rpc import load_secret

        async with Client(cluster.address, load_secret(cluster.secret)) as client:
            root = await client.resolve("/")
            return (await client.mkdir(root.ino, b"bench", 0o755, 0, 0)).ino

    directory = trio.run(mkdir)
    status = cluster.status()
    ids = {n["address"]: n["id"] for n in status["nodes"]}
    names = {c.name: ids[c.address] for c in cluster.children.values()
             if c.name.startswith("node-")}
    r = int(status.get("replicas", 3))
    started = time.monotonic()
    cluster.stop()
    placed = seed_coordinator(cluster.root / "coordinator", directory, count,
                              sorted(names.values()), r)
    first_blob, placements = placed[0][0], [p for _, p in placed]
    for name, node_id in names.items():
        seed_node(cluster.root / name, node_id, count, first_blob, placements)
    coordinator = cluster.children["coordinator"]
    coordinator.argv = [cluster.address if a == "127.0.0.1:0" else a for a in coordinator.argv]
    _restart(cluster)
    return time.monotonic() - started


def _restart(cluster: LocalCluster) -> None:
    for child in cluster.children.values():
        child.start()
        child.wait_listening(timeout=120)
    # Long: a leader on etcd loads its whole cache (every key of 10^5 files) before it serves.
    deadline = time.monotonic() + RESTART_WAIT
    while sum(n["state"] == "up" for n in cluster.status()["nodes"]) < cluster.nodes:
        if time.monotonic() > deadline:
            raise SystemExit(f"nodes did not come back up in {RESTART_WAIT:.0f} s")
        time.sleep(0.2)


def to_etcd(cluster: LocalCluster) -> float:
    """The seeded LMDB cluster moved onto three local etcd members with `dfs meta migrate`
    (seeding writes LMDB; etcd gets what a user's migration would give it)."""
    from dfs.cli.etcd_members import LocalEtcd

    started = time.monotonic()
    cluster.stop()
    cluster.etcd = LocalEtcd(cluster.root, 3)
    cluster.etcd.start()
    moved = cluster.dfs("meta", "migrate", "--data", str(cluster.root / "coordinator"),
                        "--to", cluster.etcd.url, "--json")
    if moved.returncode != 0:
        raise SystemExit(f"dfs meta migrate failed: {moved.stderr.decode()}")
    cluster.children["coordinator"].argv += ["--meta", cluster.etcd.url]
    cluster.meta = "etcd"
    _restart(cluster)
    return time.monotonic() - started


def _status_kb(pid: int | None, field: str) -> int:
    """One KiB figure of /proc/PID/status (VmHWM: peak RSS so far; RssAnon: the heap part of
    RSS now, without the LMDB file pages a scan maps in)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonPeak:
    """The peak of a process's anonymous RSS while a block runs, sampled every 50 ms: the
    coordinator's own memory, which must not grow with the namespace (file pages of its
    LMDB map do, and are the page cache's to drop)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.before = self.peak = _status_kb(pid, "RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _status_kb(self.pid, "RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed_check(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    """`dfs check ... --json` timed, with the peak RSS of the check process (wait4) and the
    coordinator's peak RSS before and after it."""
    coordinator = cluster.children["coordinator"].pid
    rss = cluster.root / "check.maxrss"
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss)] if Path("/usr/bin/time").exists() \
        else []
    started = time.monotonic()
    with AnonPeak(coordinator) as anon:
        result = subprocess.run([*timer, *DFS, "check", *args, "--json"], capture_output=True,
                                env=cluster.env(), timeout=3600)
    elapsed = time.monotonic() - started
    if result.returncode not in (0, 3):
        raise SystemExit(f"dfs check {' '.join(args)} failed: {result.stderr.decode()}")
    doc = json.loads(result.stdout)
    peak_kb = int(rss.read_text().split()[-1]) if timer and rss.exists() else 0
    return {"wall_s": round(elapsed, 3), "check_s": doc["elapsed_s"], "exit": result.returncode,
            "files": doc["files"], "replicas": doc["replicas"], "timings": doc["timings"],
            "findings": doc.get("findings_total", len(doc["findings"])),
            "memory": doc.get("memory", {}),
            "check_peak_rss_mb": round(peak_kb / 1024, 1),
            "coordinator_anon_rss_mb": [round(anon.before / 1024, 1),
                                        round(anon.peak / 1024, 1)],
            "coordinator_peak_rss_mb": round(_status_kb(coordinator, "VmHWM") / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-check", description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed N files straight into the stopped processes' LMDB (no "
                             "data; only the plain check is timed, with peak RSS)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's tmp dir")
    parser.add_argument("--no-remove", action="store_true",
                        help="skip the node-remove re-replication part (big N: it is slow)")
    parser.add_argument("--meta", choices=("lmdb", "etcd"), default="lmdb",
                        help="the coordinator's metadata store (etcd: 3 local members)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dfs-bench-check."))
    # Seeding writes LMDB: an etcd cluster is seeded on LMDB, then migrated (to_etcd).
    cluster = LocalCluster(root, args.nodes, "lmdb" if args.seed else args.meta)
    out: dict[str, Any] = {"files": args.files, "size": args.size, "nodes": args.nodes,
                           "meta": args.meta}
    try:
        cluster.start()
        if args.seed:
            out["files"] = args.seed
            out["seed_s"] = round(seed(cluster, args.seed), 3)
            if args.meta == "etcd":
                out["migrate_s"] = round(to_etcd(cluster), 3)
            out["check"] = timed_check(cluster)
            return _finish(out, args)
        out["write_s"] = round(trio.run(write_files, cluster, args.files, args.size,
                                        args.writers), 3)
        out["check"] = timed_check(cluster)
        out["check_deep"] = timed_check(cluster, "--deep")
        if args.no_remove:
            return _finish(out, args)
        victim = cluster.children[f"node-{args.nodes}"]
        node_id = next(n["id"] for n in cluster.status()["nodes"]
                       if n["address"] == victim.address)
        victim.kill(signal.SIGKILL)
        started = time.monotonic()
        removed = cluster.dfs("node", "remove", str(node_id), "--json")
        elapsed = time.monotonic() - started
        if removed.returncode != 0:
            raise SystemExit(f"dfs node remove failed: {removed.stderr.decode()}")
        moved = json.loads(removed.stdout)["moved"]
        rr = cluster.status().get("rereplication", {})
        out["rereplication"] = {"files": moved, "wall_s": round(elapsed, 3),
                                "files_per_s": round(moved / elapsed, 1) if elapsed else 0,
                                "coordinator_files_per_s": rr.get("files_per_s"),
                                "failed": rr.get("failed")}
        out["check_after"] = timed_check(cluster, "--deep")
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return _finish(out, args)


def _finish(out: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _table(out)
    return 0


def _table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dfs check on {out['files']} files of {out['size']} B, "
                        f"{out['nodes']} nodes, R=3, metadata in {out['meta']}")
    table.add_column("measure")
    table.add_column("time", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("note")
    n = out["files"]
    if "write_s" in out:
        table.add_row("write (client library)", f"{out['write_s']:.2f} s",
                      f"{n / out['write_s']:.0f} files/s", "")
    if "seed_s" in out:
        table.add_row("seed (LMDB, no data)", f"{out['seed_s']:.2f} s", "", "")
    for key, label in (("check", "dfs check"), ("check_deep", "dfs check --deep"),
                       ("check_after", "dfs check --deep (after)")):
        if key not in out:
            continue
        c = out[key]
        table.add_row(label, f"{c['wall_s']:.2f} s", f"{c['files'] / c['check_s']:.0f} files/s",
                      f"exit {c['exit']}, {c['findings']} findings, in-process "
                      f"{c['check_s']:.2f} s, peak RSS {c['check_peak_rss_mb']} MB, "
                      f"coordinator heap {c['coordinator_anon_rss_mb']} MB")
    rr = out.get("rereplication")
    if rr is not None:
        table.add_row("re-replication (node remove)", f"{rr['wall_s']:.2f} s",
                      f"{rr['files_per_s']:.0f} files/s", f"{rr['files']} files moved")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
