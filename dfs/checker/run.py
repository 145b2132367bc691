"""One `dfs check`: collect, judge, confirm, optionally repair; a Report for the CLI."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dfs.checker import repair as repairing
from dfs.checker import scan
from dfs.checker.collect import Collector, ProgressFn
from dfs.checker.findings import BLOB_KINDS, Finding, Kind
from dfs.checker.scan import NodeView, Paths, Snapshot

if TYPE_CHECKING:
    from dfs.client import Client

ORDER = {kind: i for i, kind in enumerate(Kind)}


@dataclass
class Report:
    path: str
    deep: bool
    repair: bool
    r: int = 0
    files: int = 0  # regular files checked
    replicas: int = 0  # copies checked
    verified_bytes: int = 0
    nodes: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # STAGED/PREPARED leftovers being cleaned up by their node: info, not findings.
    cleanup: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def ok(self) -> bool:
        """Exit 0: nothing found, or (with --repair) everything found was fixed."""
        return all(f.fixed for f in self.findings) if self.repair else self.clean

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "deep": self.deep, "repair": self.repair, "replicas_wanted": self.r,
            "files": self.files, "replicas": self.replicas,
            "verified_bytes": self.verified_bytes, "nodes": self.nodes,
            "clean": self.clean, "ok": self.ok, "summary": scan.summary(self.findings),
            "findings": [f.to_json() for f in self.findings],
            "cleanup_in_progress": self.cleanup, "notes": self.notes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "elapsed_s": round(self.elapsed_s, 3),
        }


async def run_check(client: Client, *, path: str = "/", deep: bool = False,
                    repair: bool = False, progress: ProgressFn | None = None) -> Report:
    started = time.monotonic()
    report = Report(path, deep, repair)
    collector = Collector(client, progress)
    info = await client.query("check_info")
    snapshot = Snapshot(r=int(info["replicas"]))
    report.r = snapshot.r
    for n in info["nodes"]:
        snapshot.nodes[n["id"]] = NodeView(n["id"], n["address"], n["state"])
    top = 1 if path == "/" else (await client.resolve(path)).ino
    whole = top == 1

    meta_started = trio.current_time()
    await collector._timed("metadata", collector.inodes(snapshot, info.get("files")))
    snapshot.entries = await collector._timed("metadata", collector.entries())
    snapshot.gc = await collector._timed("metadata", collector.gc())
    await collector._timed("nodes", collector.list_nodes(snapshot))
    report.nodes = [{"id": v.id, "address": v.address, "state": v.state, "listed": v.listed,
                     "blobs": len(v.blobs or ()), "note": v.note}
                    for v in snapshot.nodes.values()]
    paths = Paths(snapshot.entries)
    files = [f for f in snapshot.regular() if whole or paths.under(f.ino, top)]
    report.files = len(files)
    report.replicas = sum(len(set(f.replicas)) for f in files)

    findings = scan.check_replicas(files, snapshot.nodes, snapshot.r)
    findings = await collector._timed("confirm", collector.confirm_replicas(findings, snapshot))
    if whole:
        candidates = scan.unreferenced(snapshot)
        if candidates and trio.current_time() - meta_started > float(info["retention_s"]) / 2:
            candidates = await _recheck_references(collector, snapshot, candidates)
            report.notes.append("slow scan: unreferenced blobs checked against a second pass")
        unreferenced, inflight = await collector._timed("confirm",
                                                        collector.confirm_blobs(candidates))
        leftovers = [f for f in unreferenced if f.kind in scan.LEFTOVER_KINDS]
        ages = await collector._timed("confirm", collector.leftover_ages(snapshot, leftovers))
        blob_findings, report.cleanup = scan.split_cleanup(unreferenced, inflight, ages)
        findings += blob_findings
        if report.cleanup:
            report.notes.append(f"{len(report.cleanup)} STAGED/PREPARED leftovers are being "
                                "cleaned up by their nodes (not findings; --json lists them)")
        ns = scan.check_namespace(snapshot.files, snapshot.entries)
        findings += await collector._timed("confirm", collector.confirm_namespace(ns))
    else:
        report.notes.append(f"only files under {path}: orphan, leftover and namespace checks "
                            "need the whole file system")
    if deep:
        skip = {(f.node, f.blob) for f in findings if f.node is not None and f.blob is not None}
        verdicts = await collector._timed("verify", collector.verify(snapshot, files, skip))
        by_blob = {f.blob: f for f in files if f.blob is not None}
        report.verified_bytes = sum(by_blob[b].size for (_, b), v in verdicts.items()
                                    if b in by_blob and v.get("state"))
        for node_id, (count, why) in sorted(collector.unverified.items()):
            report.notes.append(f"node {node_id}: {count} copies not re-hashed ({why})")
        deep_findings = scan.check_deep(verdicts, by_blob)
        findings += await collector._timed("confirm",
                                           collector.confirm_replicas(deep_findings, snapshot))
    findings += scan.lost_files(findings, snapshot.files)
    for f in findings:
        f.path = paths.path(f.ino) if f.kind is not Kind.DANGLING else _entry_path(paths, f)
    findings.sort(key=lambda f: (ORDER[f.kind], f.path or "", f.ino or 0, f.node or 0,
                                 f.blob or 0))
    report.findings = findings
    if repair and findings:
        await collector._timed("repair", repairing.repair(client, findings, progress))
    report.timings = collector.timings
    report.elapsed_s = time.monotonic() - started
    return report


def _entry_path(paths: Paths, f: Finding) -> str | None:
    parent = paths.path(f.parent)
    if parent is None or f.name is None:
        return None
    return parent.rstrip("/") + "/" + f.name.decode("utf-8", "surrogateescape")


async def _recheck_references(collector: Collector, snapshot: Snapshot,
                              candidates: list[Finding]) -> list[Finding]:
    """The first pass took long enough that a commit's record may have been purged since:
    read the inodes and the GC queue again and drop what they account for."""
    again = Snapshot(r=snapshot.r)
    await collector.inodes(again, None)
    gc = await collector.gc()
    referenced = {(n, f.blob) for f in again.regular() for n in f.replicas}
    return [f for f in candidates if f.kind in BLOB_KINDS
            and (f.node, f.blob) not in referenced and (f.node, f.blob) not in gc]
