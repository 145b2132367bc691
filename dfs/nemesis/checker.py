"""What must hold of a campaign's history (docs/design.md §9, I1 and I2), judged after the fact.

Each file is a register written with unique values, so every read names the write it saw, and
the checks below are sound without searching for a linearization:

- mixed-read: bytes that are not exactly one write's content (I1: never a mix).
- aborted-write-visible: a read saw a write that certainly failed.
- read-from-future: a read saw a write invoked after the read had completed.
- version-conflict: one (file, version) observed with two different contents.
- stale-read: a library read began after an ok write W2 completed, yet saw a write that had
  completed before W2 began (or a lower version than W2's). Mount reads get ATTR_SLACK seconds
  of grace for other clients' writes: the mount caches attributes for a short TTL, by design
  (docs/design.md §7); none for the mount's own writes (close-to-open).
- conditional-write: an ok if_version write that did not produce exactly base + 1, or two
  ok if_version writes from the same base (the lost-update guard failed).

The final state is judged the same way (final.py), as one more read that began after everything.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dfs.nemesis.history import FAIL, INITIAL, OK, History, Op

ATTR_SLACK = 3.0  # mount reads may lag this far behind (attribute TTL 1 s, with margin)


@dataclass
class Violation:
    kind: str
    file: str
    msg: str
    ops: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "msg": self.msg, "ops": self.ops}


def check_history(history: History, skip: frozenset[str] = frozenset()) -> list[Violation]:
    """Judge every op but those made `via` one of `skip` (the mount load's, which the
    versions they leave judge: mount_load.py)."""
    violations: list[Violation] = []
    by_file: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops.values():
        if op.via not in skip:
            by_file[op.file].append(op)
    for file, ops in sorted(by_file.items()):
        writes = {op.id: op for op in ops if op.f == "write"}
        ok_writes = [op for op in writes.values() if op.outcome == OK]
        reads = [op for op in ops if op.f == "read" and op.outcome == OK]
        violations += _check_reads(history, file, reads, writes)
        violations += _check_versions(file, reads, ok_writes)
        for read in reads:
            if read.problem is None:  # a mix is reported as such, not also as stale
                slack = 0.0 if read.via == "lib" else ATTR_SLACK
                violations += check_recency(history, read, ok_writes, slack)
        violations += _check_conditional(file, ok_writes)
    return violations


def _check_reads(history: History, file: str, reads: list[Op], writes: dict[int, Op]
                 ) -> list[Violation]:
    out: list[Violation] = []
    for read in reads:
        if read.problem is not None:
            out.append(Violation("mixed-read", file, f"read {read.id} ({read.via}): "
                                 f"{read.problem}", [read.id]))
            continue
        if read.saw == INITIAL or read.saw is None:
            continue
        writer = writes.get(read.saw)
        if writer is None:
            out.append(Violation("mixed-read", file, f"read {read.id} saw op {read.saw}, "
                                 "a write of another file", [read.id, read.saw]))
        elif writer.outcome == FAIL:
            out.append(Violation("aborted-write-visible", file,
                                 f"read {read.id} saw write {writer.id}, which failed "
                                 f"({writer.error}){_tried(writer)}", [read.id, writer.id]))
        elif read.complete is not None and writer.invoke > read.complete:
            out.append(Violation("read-from-future", file, f"read {read.id} saw write "
                                 f"{writer.id}, invoked after the read completed",
                                 [read.id, writer.id]))
    return out


def _tried(write: Op) -> str:
    """What the write's client sent and heard (COMMIT txids, outcome answers), if known."""
    return f" [{write.detail}]" if write.detail else ""


def _check_versions(file: str, reads: list[Op], ok_writes: list[Op]) -> list[Violation]:
    seen: dict[int, dict[int, int]] = defaultdict(dict)  # version -> {content op: witness op}
    for read in reads:
        if read.via == "lib" and read.version is not None and read.problem is None:
            seen[read.version].setdefault(read.saw or INITIAL, read.id)
    for write in ok_writes:
        if write.version_known and write.version is not None:
            seen[write.version].setdefault(write.id, write.id)
    out: list[Violation] = []
    for version, contents in sorted(seen.items()):
        if len(contents) > 1:
            out.append(Violation("version-conflict", file,
                                 f"version {version} holds the content of ops "
                                 f"{sorted(contents)} (witnesses {sorted(contents.values())})",
                                 sorted(contents.values())))
    return out


def check_recency(history: History, read: Op, ok_writes: list[Op], slack: float = 0.0
                  ) -> list[Violation]:
    """The read must not see a write that an ok write completed before it had superseded."""
    saw = history.ops.get(read.saw) if read.saw not in (None, INITIAL) else None
    out: list[Violation] = []
    for w2 in ok_writes:
        # The mount reads its own writes at once (close-to-open, as AFS): no slack for them.
        grace = 0.0 if w2.via == read.via == "mount" else slack
        if w2.id == read.saw or w2.complete is None or w2.complete + grace >= read.invoke:
            continue
        if read.saw == INITIAL:
            why = "the initial empty content"
        elif saw is not None and saw.outcome == OK and saw.complete is not None \
                and saw.complete < w2.invoke:
            why = f"write {saw.id}, which completed before write {w2.id} began"
        elif (read.via == "lib" and read.version is not None and w2.version_known
              and w2.version is not None and read.version < w2.version):
            why = f"version {read.version} < version {w2.version} of write {w2.id}"
        else:
            continue
        out.append(Violation("stale-read", read.file, f"read {read.id} ({read.via}) began "
                             f"after write {w2.id} was ok, yet saw {why}",
                             [read.id, w2.id, *([saw.id] if saw else [])]))
        break  # one witness per read is enough
    return out


def _check_conditional(file: str, ok_writes: list[Op]) -> list[Violation]:
    out: list[Violation] = []
    by_base: dict[int, list[int]] = defaultdict(list)
    for write in ok_writes:
        if not write.if_version or write.base is None:
            continue
        by_base[write.base].append(write.id)
        if write.version_known and write.version != write.base + 1:
            out.append(Violation("conditional-write", file, f"write {write.id} based on "
                                 f"version {write.base} produced version {write.version}",
                                 [write.id]))
    for base, ids in sorted(by_base.items()):
        if len(ids) > 1:
            out.append(Violation("conditional-write", file, f"writes {ids} were all based "
                                 f"on version {base} and all succeeded: a lost update", ids))
    return out
