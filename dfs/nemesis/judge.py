"""Judge before repairing: every finding of the first `dfs check --deep` after healing must be
explained by a fault the nemesis injected, or it is a violation.

The nemesis keeps a `Ledger` of what it did that may legitimately leave a finding behind:
every bit it flipped (node, blob, chunk), the nodes it removed (their data directory deleted
for good) and the nodes it could not bring back. `attribute` matches findings (the `--json`
records of docs/checker.md, node ids resolved to the nemesis's names) against it:

- `corrupt_chunk` / `checksum_mismatch` on a (node, blob) it bit-flipped: explained (for
  `corrupt_chunk`, only if the failing chunks are among the ones flipped there);
- `missing_replica` on such a (node, blob): explained too, as the documented result of an
  in-place repair of that bad copy that was interrupted after dropping it (checker.md: "the
  same number of good copies");
- any replica finding on a node the nemesis removed or left down: explained;
- `lost_file`: explained only if every bad copy of that file is explained (the nemesis never
  flips more than one node's copy of a blob, so in practice this is always a violation);
- a leftover the checker itself marks as cleanup in progress (a true `cleanup_in_progress`
  or `in_progress` field on the record): explained;
- anything else, and any kind this module does not know: a violation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dfs.nemesis.checker import Violation

FLIP_KINDS = frozenset({"corrupt_chunk", "checksum_mismatch"})
REPLICA_KINDS = frozenset({"missing_replica", "size_mismatch", "checksum_mismatch",
                           "corrupt_chunk", "under_replicated"})
CLEANUP_MARKS = ("cleanup_in_progress", "in_progress")


@dataclass
class BitFlip:
    node: str  # the nemesis's name for the node ("node-3")
    blob: int
    chunk: int
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "blob": self.blob, "index": self.chunk, "time": self.time}


@dataclass
class Ledger:
    """What the nemesis did that a later check may still see."""

    flips: list[BitFlip] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)  # not brought back by the final heal

    def flip(self, node: str, blob: int, chunk: int, time: float = 0.0) -> None:
        self.flips.append(BitFlip(node, blob, chunk, time))

    def flipped(self, node: str, blob: int) -> set[int]:
        return {f.chunk for f in self.flips if f.node == node and f.blob == blob}

    def flipped_elsewhere(self, node: str) -> set[int]:
        """Blobs already flipped on another node: flipping them here too could destroy every
        good copy, and a lost file must always mean a bug, never the nemesis."""
        return {f.blob for f in self.flips if f.node != node}


@dataclass
class Attribution:
    """One finding of the judged check and why it is (or is not) explained."""

    finding: dict[str, Any]
    node: str | None  # the nemesis's name of finding["node"], if any
    reason: str | None  # None: unexplained

    def to_json(self) -> dict[str, Any]:
        return {**self.finding, "node_name": self.node, "explained_by": self.reason}


def attribute(findings: list[dict[str, Any]], ledger: Ledger, names: dict[int, str]
              ) -> tuple[list[Attribution], list[Violation]]:
    """Each finding with the fault that explains it; the unexplained ones as violations."""
    out: list[Attribution] = []
    for f in findings:
        name = names.get(f["node"]) if f.get("node") is not None else None
        out.append(Attribution(f, name, _explain(f, name, ledger)))
    _explain_lost(out)
    violations = [Violation("unexplained-finding", a.finding.get("path") or "*", describe(a),
                            []) for a in out if a.reason is None]
    return out, violations


def describe(a: Attribution) -> str:
    f = a.finding
    where = f"node {f.get('node')}" + (f" ({a.node})" if a.node else "") \
        if f.get("node") is not None else "no node"
    chunks = f" chunks {f['chunks']}" if f.get("chunks") else ""
    return (f"{f.get('kind')} on {where}, ino {f.get('ino')}, blob {f.get('blob')}{chunks}: "
            f"{f.get('detail', '')}")


def _explain(f: dict[str, Any], name: str | None, ledger: Ledger) -> str | None:
    kind = f.get("kind")
    if any(f.get(mark) is True for mark in CLEANUP_MARKS):
        return "cleanup in progress (so labelled by the checker)"
    if name is not None and kind in REPLICA_KINDS and name in ledger.removed:
        return f"{name} was removed by the nemesis"
    if name is not None and kind in REPLICA_KINDS and name in ledger.down:
        return f"{name} was left down"
    blob = f.get("blob")
    if name is None or blob is None:
        return None
    flipped = ledger.flipped(name, int(blob))
    if not flipped:
        return None
    if kind == "corrupt_chunk":
        bad = {int(c) for c in f.get("chunks") or ()}
        if bad - flipped:
            return None  # a chunk the nemesis never touched fails its digest
        return f"bit flip in chunk(s) {sorted(bad or flipped)} of blob {blob} on {name}"
    if kind in FLIP_KINDS:
        return f"bit flip in chunk(s) {sorted(flipped)} of blob {blob} on {name}"
    if kind == "missing_replica":
        return (f"bit-flipped copy of blob {blob} on {name}, dropped by a repair that did "
                "not finish")
    return None


def _explain_lost(out: list[Attribution]) -> None:
    """A lost file is the nemesis's doing only if every bad copy of it is."""
    copies: dict[tuple[Any, Any], list[Attribution]] = defaultdict(list)
    for a in out:
        if a.finding.get("kind") in REPLICA_KINDS and a.finding.get("node") is not None:
            copies[(a.finding.get("ino"), a.finding.get("blob"))].append(a)
    for a in out:
        if a.finding.get("kind") != "lost_file":
            continue
        bad = copies.get((a.finding.get("ino"), a.finding.get("blob")), [])
        if bad and all(c.reason is not None for c in bad):
            a.reason = "every copy was destroyed by injected faults: " + "; ".join(
                str(c.reason) for c in bad)


def tally(attributions: list[Attribution]) -> dict[str, int]:
    """Findings per kind and verdict, for the summary ("corrupt_chunk explained": 2)."""
    counts: dict[str, int] = defaultdict(int)
    for a in attributions:
        counts[f"{a.finding.get('kind')} "
               f"{'explained' if a.reason is not None else 'UNEXPLAINED'}"] += 1
    return dict(sorted(counts.items()))
