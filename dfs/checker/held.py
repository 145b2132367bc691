"""The copies kept versions and snapshots hold (docs/checker.md, "Kept versions and
snapshots"): judged like a current file's, with point lookups on the nodes, a page at a time.

The merge by blob id covers current files only (the `blobs` index); a node's copy of a kept
or snapshot blob is no orphan there (`blob_refs` calls it current), but whether every such
copy is there and whole is asked here. A page is split so that each ino appears once per
batch (a file keeps several versions), judged, confirmed against the rows read again
(`held_rows`: gone or changed, the finding is dropped), and repaired before the next, through
the same `repair_files` that finds the record naming the blob (Replicator.fix).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dfs.checker import scan
from dfs.checker.findings import Finding, Kind
from dfs.checker.scan import FileRow, NodeView

if TYPE_CHECKING:
    from dfs.checker.collect import Collector

KINDS = ("versions", "snapshots")


def _label(kind: str, row: FileRow, at: int) -> str:
    return (f"ino {row.ino}, kept version {at}" if kind == "versions"
            else f"ino {row.ino} in snapshot {at}")


def _batches(rows: list[tuple[FileRow, int]]) -> list[list[tuple[FileRow, int]]]:
    """Split so that no ino comes twice in a batch (findings are keyed by ino)."""
    out: list[list[tuple[FileRow, int]]] = []
    for row in rows:
        for batch in out:
            if all(r.ino != row[0].ino for r, _ in batch):
                batch.append(row)
                break
        else:
            out.append([row])
    return out


async def check_held(c: Collector, r: int, deep: bool,
                     copies: Callable[[list[FileRow]], Awaitable[dict[int, NodeView]]],
                     emit: Callable[[list[Finding]], Awaitable[None]],
                     counted: Callable[[list[FileRow]], None]) -> int:
    """Every kept version's and snapshot file's copies; returns how many rows were judged."""
    judged = 0
    for kind in KINDS:
        after = b""
        while True:
            reply = await c.client.query("scan_held", kind=kind, after=after, limit=c.page)
            rows = [(FileRow.from_wire(row), at) for row, at in reply["rows"]]
            for batch in _batches(rows):
                await _judge(c, kind, batch, r, deep, copies, emit)
                counted([f for f, _ in batch])
                judged += len(batch)
            if reply.get("last") is None:
                break
            after = reply["last"]
    return judged


async def _judge(c: Collector, kind: str, batch: list[tuple[FileRow, int]], r: int,
                 deep: bool, copies: Callable[[list[FileRow]], Awaitable[dict[int, NodeView]]],
                 emit: Callable[[list[Finding]], Awaitable[None]]) -> None:
    files = [f for f, _ in batch]
    nodes = await copies(files)
    findings = scan.check_replicas(files, nodes, r)
    if deep:
        skip = {(f.node, f.blob) for f in findings if f.node is not None}
        verdicts = await c._timed("verify", c.verify(nodes, files, skip))
        findings += scan.check_deep(verdicts, {f.blob: f for f in files if f.blob})
    if not findings:
        return
    at_of = {f.ino: at for f, at in batch}
    now = await c.client.query("held_rows", keys=[[kind, f.ino, at_of[f.ino]] for f in files])
    fresh: dict[int, Any] = {f.ino: row for f, row in zip(files, now["rows"], strict=True)}
    rows = {f.ino: f for f in files}
    kept = []
    for finding in findings:
        old, new = rows.get(finding.ino or 0), fresh.get(finding.ino or 0)
        if old is None or new is None:
            continue  # the version was dropped or the snapshot deleted meanwhile
        new_row = FileRow.from_wire(new)
        if (new_row.blob, tuple(new_row.replicas)) != (old.blob, old.replicas):
            continue  # a repair moved its copies meanwhile
        kept.append(finding)
    kept += scan.lost_files(kept, rows)
    for finding in kept:
        finding.path = _label(kind, rows[finding.ino or 0], at_of[finding.ino or 0])
    await emit(kept)


async def check_refs(c: Collector, repair: bool) -> list[Finding]:
    """The reference counts (dfs/meta/refcheck.py): judged by one `check_refs`, then, with
    repair, a second that fixes each finding it still sees (re-checked in its own write)."""
    judged = await c.client.query("check_refs")
    out = [_ref_finding(f) for f in judged["findings"]]
    if repair and out:
        reply = await c.client.change("check_refs", repair=True)
        fixed = {_ref_key(f) for f in reply["fixed"]}
        for finding, raw in zip(out, judged["findings"], strict=True):
            finding.fixed = _ref_key(raw) in fixed
            finding.fix = "index entry rewritten" if finding.fixed else "not found again"
    return out


def _ref_key(f: dict[str, Any]) -> tuple[Any, ...]:
    return (f["kind"], f["table"], f["blob"], f["ino"], f["at"])


def _ref_finding(f: dict[str, Any]) -> Finding:
    what = {"missing_ref": "no index entry (GC could delete its copies)",
            "stale_ref": "an index entry for a record that is gone (a leak)",
            "orphan_version": "a kept version of a deleted file (a leak)"}[f["kind"]]
    where = "version" if f["table"] in ("retained", "versions") else "snapshot"
    return Finding(Kind.REFCOUNT, f["ino"], None, f["blob"],
                   f"{f['table']}: {what}", path=f"ino {f['ino']}, {where} {f['at']}")
