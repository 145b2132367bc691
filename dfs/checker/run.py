"""One `dfs check`: stream, judge, confirm, optionally repair, a batch at a time; a Report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dfs.checker import repair as repairing
from dfs.checker import scan
from dfs.checker.collect import Collector, ProgressFn
from dfs.checker.findings import Finding, Kind
from dfs.checker.held import check_held, check_refs
from dfs.checker.merge import BlobMerge, candidate
from dfs.checker.namespace import Namespace, walk_subtree
from dfs.checker.scan import FileRow, NodeView
from dfs.errors import DfsError

if TYPE_CHECKING:
    from dfs.client import Client

ORDER = {kind: i for i, kind in enumerate(Kind)}
FINDINGS_KEPT = 10_000  # findings held for the report; the rest are counted (and repaired)
CLEANUP_KEPT = 1_000  # cleanup-in-progress records held for the report; the rest are counted


@dataclass
class Report:
    path: str
    deep: bool
    repair: bool
    r: int = 0
    files: int = 0  # regular files checked
    held: int = 0  # kept versions and snapshots' files checked (dfs/checker/held.py)
    replicas: int = 0  # copies checked
    verified_bytes: int = 0
    nodes: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # the first FINDINGS_KEPT
    counts: dict[Kind, list[int]] = field(default_factory=dict)  # kind -> [found, fixed]
    unfixed: int = 0
    # STAGED/PREPARED leftovers being cleaned up by their node: info, not findings.
    cleanup: list[dict[str, Any]] = field(default_factory=list)
    cleanup_total: int = 0
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.counts.values())

    @property
    def clean(self) -> bool:
        return not self.counts

    @property
    def ok(self) -> bool:
        """Exit 0: nothing found, or (with --repair) everything found was fixed."""
        return self.unfixed == 0 if self.repair else self.clean

    def add(self, findings: list[Finding]) -> None:
        """Count judged (and, with --repair, repaired) findings; keep the first ones."""
        for f in findings:
            c = self.counts.setdefault(f.kind, [0, 0])
            c[0] += 1
            c[1] += bool(f.fixed)
            self.unfixed += self.repair and not f.fixed
            if len(self.findings) < FINDINGS_KEPT:
                self.findings.append(f)

    def add_cleanup(self, records: list[dict[str, Any]]) -> None:
        self.cleanup_total += len(records)
        self.cleanup.extend(records[:max(0, CLEANUP_KEPT - len(self.cleanup))])

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "deep": self.deep, "repair": self.repair, "replicas_wanted": self.r,
            "files": self.files, "held": self.held, "replicas": self.replicas,
            "verified_bytes": self.verified_bytes, "nodes": self.nodes,
            "clean": self.clean, "ok": self.ok,
            "summary": {k.value: c[0] for k, c in sorted(self.counts.items(),
                                                         key=lambda kc: kc[0].value)},
            "findings": [f.to_json() for f in self.findings],
            "findings_total": self.total,
            "findings_truncated": self.total > len(self.findings),
            "cleanup_in_progress": self.cleanup, "cleanup_total": self.cleanup_total,
            "notes": self.notes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "memory": self.memory,
            "elapsed_s": round(self.elapsed_s, 3),
        }


async def run_check(client: Client, *, path: str = "/", deep: bool = False,
                    repair: bool = False, progress: ProgressFn | None = None,
                    page: int | None = None) -> Report:
    """Judge in batches, each confirmed (and, with --repair, repaired) before the next."""
    started = time.monotonic()
    report = Report(path, deep, repair)
    check = _Check(client, report, Collector(client, progress, page), progress)
    info = await client.query("check_info")
    report.r = check.r = int(info["replicas"])
    for n in info["nodes"]:
        check.nodes[n["id"]] = NodeView(n["id"], n["address"], n["state"])
    top = 1 if path == "/" else (await client.resolve(path)).ino
    if top == 1:
        await check.whole()
    else:
        await check.subtree(top, path)
        report.notes.append(f"only files under {path}: orphan, leftover and namespace checks "
                            "need the whole file system")
    for node_id, (count, why) in sorted(check.c.unverified.items()):
        report.notes.append(f"node {node_id}: {count} copies not re-hashed ({why})")
    if report.cleanup_total:
        report.notes.append(f"{report.cleanup_total} STAGED/PREPARED leftovers are being "
                            "cleaned up by their nodes (not findings; --json lists them)")
    if report.total > len(report.findings):
        report.notes.append(f"{report.total} findings: the first {len(report.findings)} are "
                            "listed, all are counted" + (" and were repaired" if repair else ""))
    for f in report.findings:
        if f.path is None:
            f.path = await check.names.path(f)
    report.findings.sort(key=lambda f: (ORDER[f.kind], f.path or "", f.ino or 0, f.node or 0,
                                        f.blob or 0))
    report.memory["page"] = check.c.page
    report.memory["findings_kept_max"] = FINDINGS_KEPT
    report.timings = check.c.timings
    report.elapsed_s = time.monotonic() - started
    return report


class _Check:
    def __init__(self, client: Client, report: Report, collector: Collector,
                 progress: ProgressFn | None) -> None:
        self.client = client
        self.report = report
        self.c = collector
        self.progress = progress
        self.r = 0
        self.nodes: dict[int, NodeView] = {}
        self.names = Namespace(collector, self.emit)

    async def emit(self, findings: list[Finding]) -> None:
        """A judged and confirmed batch: repaired (if asked) before the next is judged."""
        if self.report.repair and findings:
            await self.c._timed("repair", repairing.repair(self.client, findings,
                                                           self.progress))
        self.report.add(findings)

    def _count(self, files: list[FileRow]) -> None:
        self.report.replicas += sum(len(set(f.replicas)) for f in files)

    async def judge(self, files: list[FileRow], nodes: dict[int, NodeView],
                    paths: dict[int, str] | None = None) -> None:
        """Replica findings (and --deep verdicts) of one batch of files."""
        report, c = self.report, self.c
        rows = {f.ino: f for f in files}
        report.files += len(files)
        report.replicas += sum(len(set(f.replicas)) for f in files)
        findings = scan.check_replicas(files, nodes, self.r)
        findings = await c._timed("confirm", c.confirm_replicas(findings, rows, nodes, self.r))
        if report.deep:
            skip = {(f.node, f.blob) for f in findings
                    if f.node is not None and f.blob is not None}
            verdicts = await c._timed("verify", c.verify(nodes, files, skip))
            by_blob = {f.blob: f for f in files if f.blob is not None}
            report.verified_bytes += sum(by_blob[b].size for (_, b), v in verdicts.items()
                                         if b in by_blob and v.get("state"))
            deep_findings = scan.check_deep(verdicts, by_blob)
            findings += await c._timed("confirm", c.confirm_replicas(deep_findings, rows,
                                                                     nodes, self.r))
        findings += scan.lost_files(findings, rows)
        if paths is not None:
            for f in findings:
                f.path = paths.get(f.ino or 0)
        await self.emit(findings)

    async def candidates(self, batch: list[Finding]) -> None:
        """Blobs no file of their window lists on that node: not queued for GC (read after
        the listing), unreferenced or in flight at the coordinator (`blob_refs`), and, of the
        unreferenced, still on the node (asked last; a copy the GC deleted after the listing
        is gone): orphans, leftovers, or cleanup in progress. Only unreferenced blobs cost a
        node request, as before the streaming design."""
        c = self.c
        left = await c._timed("confirm", c.not_queued({(f.node or 0, f.blob or 0)
                                                       for f in batch}))
        batch = [f for f in batch if (f.node, f.blob) in left]
        if not batch:
            return
        unreferenced, inflight = await c._timed("confirm", c.confirm_blobs(batch))
        unreferenced, records = await c._timed("confirm", c.restat(self.nodes, unreferenced))
        for f in unreferenced:
            record = records.get((f.node or 0, f.blob or 0))
            if record is not None:  # judged by its state now (it may have moved on)
                now = candidate(f.node or 0, f.blob or 0, record["state"], record.get("size"))
                if now.kind is not f.kind:
                    f.kind, f.detail = now.kind, now.detail
        found, cleaning = scan.split_cleanup(unreferenced, inflight, records)
        self.report.add_cleanup(cleaning)
        await self.emit(found)

    async def whole(self) -> None:
        # The reference counts first, judged and (with --repair) repaired: whether a copy is
        # an orphan depends on them, so an orphan's repair must never run on a lost entry.
        self.report.add(await check_refs(self.c, self.report.repair))
        merge = BlobMerge(self.c, self.nodes, self.candidates)
        while (window := await merge.next_window()) is not None:
            await self.judge(window.files, window.nodes)
        await merge.flush()
        self.report.memory.update(peak_held=merge.peak_held, peak_stream=merge.peak_stream)
        self.report.nodes = [
            {"id": v.id, "address": v.address, "state": v.state,
             "listed": v.id in merge.streams and not merge.failed(v.id),
             "blobs": merge.listed(v.id), "note": v.note} for v in self.nodes.values()]
        wanted = {f.ino for f in self.report.findings if f.ino is not None}
        await self.names.check(wanted)
        stated: dict[int, int] = {}
        self.report.held = await check_held(
            self.c, self.r, self.report.deep, lambda files: self._copies(files, stated),
            self.emit, self._count)
        self.report.memory["namespace_passes"] = self.names.passes
        if self.names.unindexed:
            self.report.notes.append(
                f"{self.names.unindexed} files are missing from the coordinator's blob "
                "index: their copies may be reported as orphans")

    async def subtree(self, top: int, path: str) -> None:
        row = (await self.c.fresh_inodes([top])).get(top)
        if row is None:
            return
        stated: dict[int, int] = {}

        async def batch(files: list[FileRow], paths: dict[int, str]) -> None:
            nodes = await self._copies(files, stated)
            await self.judge(files, nodes, paths)

        await walk_subtree(self.c, row, path, batch)
        self.report.nodes = [
            {"id": v.id, "address": v.address, "state": v.state,
             "listed": v.state in ("up", "draining") and not v.note,
             "blobs": stated.get(v.id, 0), "note": v.note} for v in self.nodes.values()]

    async def _copies(self, files: list[FileRow], stated: dict[int, int]
                      ) -> dict[int, NodeView]:
        """What each live node holds of these files' blobs: point lookups (`stat`), a batch
        per node, all nodes at once."""
        want: dict[int, set[int]] = {}
        for f in files:
            for n in f.replicas:
                want.setdefault(n, set()).add(f.blob or 0)
        views = {n: NodeView(v.id, v.address, v.state) for n, v in self.nodes.items()}

        async def one(node: NodeView, blobs: set[int]) -> None:
            if not blobs:
                views[node.id].blobs = {}
                return
            try:
                infos = await self.c.stat_copies(node, sorted(blobs))
            except DfsError as e:
                node.note = f"not listed: {e.msg}"
                return
            views[node.id].blobs = {int(b): (i["state"], i.get("size"), i.get("checksum"))
                                    for b, i in infos.items() if i is not None}
            stated[node.id] = stated.get(node.id, 0) + len(views[node.id].blobs or ())

        async with trio.open_nursery() as nursery:
            for n, node in self.nodes.items():
                if node.state in ("up", "draining") and not node.note:
                    nursery.start_soon(one, node, want.get(n, set()))
        return views
