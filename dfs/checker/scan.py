"""Judging what the checker collected: metadata and node listings in, findings out. Sans-IO.

Everything here is a pure function of snapshots (rows of the coordinator's inode and entry
tables, each node's blob listing, the GC queue, deep verification verdicts), so the rules of
I1-I4 (docs/design.md §9) are unit-tested on hand-made snapshots. A real check never holds a
whole snapshot: it applies `check_replicas`, `check_deep` and `lost_files` to one window of
files at a time (merge.py, namespace.py), and the whole-snapshot `unreferenced` and
`check_namespace` are the reference statements of the rules that merge.py and namespace.py
apply page by page.
"""

from __future__ import annotations

import stat
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dfs.checker.findings import BAD_COPY, Finding, Kind

ROOT_INO = 1
COMMITTED, PREPARED, STAGED = "COMMITTED", "PREPARED", "STAGED"

NodeCopy = tuple[str, int | None, bytes | None]  # a node's record of a blob: state, size, checksum


@dataclass(frozen=True, slots=True)
class FileRow:
    """One inode as `scan_inodes` sends it."""

    ino: int
    mode: int
    nlink: int
    version: int
    blob: int | None
    size: int
    checksum: bytes | None
    replicas: tuple[int, ...]
    parent: int

    @classmethod
    def from_wire(cls, row: list[Any]) -> FileRow:
        ino, mode, nlink, version, blob, size, checksum, replicas, parent = row
        return cls(ino, mode, nlink, version, blob, size, checksum, tuple(replicas), parent)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class NodeView:
    id: int
    address: str
    state: str  # up | down | draining | removed, as the coordinator reports it
    blobs: dict[int, NodeCopy] | None = None  # None: not listed (down or unreachable)
    note: str = ""

    @property
    def listed(self) -> bool:
        return self.blobs is not None


@dataclass
class Snapshot:
    """What one check saw."""

    r: int
    files: dict[int, FileRow] = field(default_factory=dict)  # every inode, by ino
    entries: list[tuple[int, bytes, int]] = field(default_factory=list)  # parent, name, ino
    gc: set[tuple[int, int]] = field(default_factory=set)  # (node, blob) queued for deletion
    nodes: dict[int, NodeView] = field(default_factory=dict)

    def regular(self) -> Iterable[FileRow]:
        return (f for f in self.files.values() if f.is_reg and f.blob is not None)


def check_replicas(files: Iterable[FileRow], nodes: Mapping[int, NodeView], r: int
                   ) -> list[Finding]:
    """I1 and I4 per file and node, from metadata alone (one checksum per replica)."""
    out: list[Finding] = []
    for f in files:
        if not f.is_reg or f.blob is None:
            continue
        listed = list(dict.fromkeys(f.replicas))
        for n in listed:
            kind, detail = _judge_copy(f, n, nodes.get(n))
            if kind is not None:
                out.append(Finding(kind, f.ino, n, f.blob, detail))
        if len(listed) < r:
            out.append(Finding(Kind.UNDER, f.ino, None, f.blob,
                               f"{len(listed)} of {r} replicas listed"))
    return out


def _judge_copy(f: FileRow, n: int, node: NodeView | None) -> tuple[Kind | None, str]:
    if node is None or node.state == "removed":
        return Kind.MISSING, f"node {n} is {'removed' if node else 'unknown'}"
    if node.blobs is None:
        return Kind.UNDER, f"node {n} is {'down' if node.state == 'down' else 'unreachable'}"
    copy = node.blobs.get(f.blob or 0)
    if copy is None:
        return Kind.MISSING, f"node {n} has no copy of blob {f.blob}"
    if copy[0] == STAGED:
        return Kind.MISSING, f"node {n} has blob {f.blob} only STAGED"
    if copy[1] != f.size:
        return Kind.SIZE, f"node {n} records {copy[1]} bytes, the file has {f.size}"
    if copy[2] != f.checksum:
        return Kind.CHECKSUM, f"node {n} records another checksum than the file's"
    return None, ""


def check_deep(verdicts: Mapping[tuple[int, int], Mapping[str, Any]],
               files_by_blob: Mapping[int, FileRow]) -> list[Finding]:
    """Findings from nodes re-reading and re-hashing their copies (`verify`)."""
    out: list[Finding] = []
    for (node, blob), v in sorted(verdicts.items()):
        f = files_by_blob.get(blob)
        if v.get("ok") or f is None:
            continue
        ino = f.ino
        if v.get("state") is None:
            out.append(Finding(Kind.MISSING, ino, node, blob, f"node {node}: copy gone"))
        elif v.get("state") == STAGED:
            out.append(Finding(Kind.MISSING, ino, node, blob, f"node {node}: only STAGED"))
        elif v.get("bad_chunks"):
            chunks = [int(c) for c in v["bad_chunks"]]
            out.append(Finding(Kind.CORRUPT, ino, node, blob,
                               f"node {node}: chunks {chunks} fail their digest", chunks))
        else:
            out.append(Finding(Kind.CHECKSUM, ino, node, blob,
                               f"node {node}: bytes fail the file's checksum"))
    return out


def lost_files(findings: Iterable[Finding], files: Mapping[int, FileRow]) -> list[Finding]:
    """Files whose every listed copy is bad, missing or on a node that is gone."""
    bad: dict[int, set[int]] = defaultdict(set)
    for f in findings:
        if f.kind in BAD_COPY and f.ino is not None and f.node is not None:
            bad[f.ino].add(f.node)
    out: list[Finding] = []
    for ino, nodes in sorted(bad.items()):
        row = files.get(ino)
        if row is not None and row.replicas and set(row.replicas) <= nodes:
            out.append(Finding(Kind.LOST, ino, None, row.blob,
                               "no good replica: every copy is missing or bad"))
    return out


def unreferenced(snapshot: Snapshot) -> list[Finding]:
    """I3 candidates: blobs on a listed node that no file lists there and GC does not owe.
    In-flight transactions and repairs are ruled out afterwards (`blob_refs`)."""
    referenced = {(n, f.blob) for f in snapshot.regular() for n in f.replicas}
    out: list[Finding] = []
    for node in snapshot.nodes.values():
        for blob, (state, size, _) in sorted((node.blobs or {}).items()):
            if (node.id, blob) in referenced or (node.id, blob) in snapshot.gc:
                continue
            kind = {COMMITTED: Kind.ORPHAN, STAGED: Kind.STAGED}.get(state, Kind.PREPARED)
            what = f"{size} bytes" if size is not None else "size unknown"
            out.append(Finding(kind, None, node.id, blob,
                               f"{state} blob {blob} ({what}) on node {node.id}: no file lists it"))
    return out


LEFTOVER_KINDS = (Kind.STAGED, Kind.PREPARED)


def split_cleanup(unreferenced: Iterable[Finding], inflight: Iterable[Finding],
                  ages: Mapping[tuple[int, int], Mapping[str, Any]]
                  ) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Real findings, and STAGED/PREPARED leftovers whose cleanup is in progress (info only):
    those of a txid the coordinator has in flight, and those idle on their node for less than
    the node's cleanup horizon (its participant resolves them in that time). A leftover gone
    from its node meanwhile is neither."""
    findings: list[Finding] = []
    cleaning: list[dict[str, Any]] = []

    def info(f: Finding, why: str, record: Mapping[str, Any] | None) -> dict[str, Any]:
        record = record or {}
        return {"kind": f.kind.value, "node": f.node, "blob": f.blob, "why": why,
                "idle_s": record.get("idle_s"), "horizon_s": record.get("horizon_s")}

    for f in inflight:
        if f.kind in LEFTOVER_KINDS:
            cleaning.append(info(f, "in flight at the coordinator", None))
    for f in unreferenced:
        if f.kind not in LEFTOVER_KINDS:
            findings.append(f)
            continue
        record = ages.get((f.node or 0, f.blob or 0))
        if record is None:
            continue  # dropped meanwhile
        idle, horizon = record.get("idle_s"), record.get("horizon_s")
        if record.get("state") in (STAGED, PREPARED) and isinstance(idle, int | float) \
                and isinstance(horizon, int | float) and idle < horizon:
            cleaning.append(info(f, "younger than the node's cleanup horizon", record))
        else:
            if isinstance(idle, int | float):
                f.detail += f"; idle {idle:.0f} s"
            findings.append(f)
    return findings, cleaning


def check_namespace(files: Mapping[int, FileRow], entries: Iterable[tuple[int, bytes, int]]
                    ) -> list[Finding]:
    """Entries naming missing inodes (or sitting in a missing directory); inodes unnamed."""
    out: list[Finding] = []
    linked: set[int] = set()
    for parent, name, ino in entries:
        directory = files.get(parent)
        if directory is None or not directory.is_dir:
            out.append(Finding(Kind.DANGLING, ino, detail=f"entry in missing directory {parent}",
                               parent=parent, name=name))
        elif ino not in files:
            out.append(Finding(Kind.DANGLING, ino, detail=f"names inode {ino}, which is gone",
                               parent=parent, name=name))
        else:
            linked.add(ino)
    for ino in sorted(files):
        if ino != ROOT_INO and ino not in linked:
            out.append(Finding(Kind.UNLINKED, ino, detail="no directory entry names it"))
    return out


class Paths:
    """Names for inodes, from the entries seen (the first name of a hard-linked file)."""

    def __init__(self, entries: Iterable[tuple[int, bytes, int]]) -> None:
        self.up: dict[int, tuple[int, bytes]] = {}
        for parent, name, ino in entries:
            self.up.setdefault(ino, (parent, name))

    def path(self, ino: int | None) -> str | None:
        if ino is None:
            return None
        parts: list[bytes] = []
        seen: set[int] = set()
        while ino != ROOT_INO:
            if ino in seen or ino not in self.up:
                return None
            seen.add(ino)
            ino, name = self.up[ino]
            parts.append(name)
        return "/" + b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def under(self, ino: int, top: int) -> bool:
        """Whether `ino` is `top` or below it."""
        seen: set[int] = set()
        while True:
            if ino == top:
                return True
            if ino == ROOT_INO or ino in seen or ino not in self.up:
                return False
            seen.add(ino)
            ino = self.up[ino][0]


def summary(findings: Iterable[Finding]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for f in findings:
        counts[f.kind.value] += 1
    return dict(sorted(counts.items()))
