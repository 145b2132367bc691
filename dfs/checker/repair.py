"""`dfs check --repair`: ask the coordinator to fix each finding, each fix one transaction.

- bad, missing or under-replicated copies: `repair_files`, many files per request; the
  coordinator re-copies each from a verified good replica through STAGE/PREPARE/COMMIT
  (dfs/coordinator/replicate.py) and answers per file;
- lost files (no good copy anywhere) are left untouched and stay findings (exit 3);
- orphans and stale leftovers: `forget_blobs`, which re-checks each blob and queues its
  deletion in the GC queue (delivered within a second);
- dangling entries are dropped and unnamed inodes linked into /lost+found
  (`repair_namespace`).

Every finding ends with `fixed` True or False and a `fix` saying what happened.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from dfs.checker.collect import ProgressFn
from dfs.checker.findings import BLOB_KINDS, NAMESPACE_KINDS, REPLICA_KINDS, Finding, Kind

if TYPE_CHECKING:
    from dfs.client import Client

FILES_PER_REQUEST = 32
REPAIR_TIMEOUT = 600.0
SETTLED = ("fixed", "ok", "moved_on")


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


async def repair(client: Client, findings: list[Finding], progress: ProgressFn | None) -> None:
    progress = progress or _no_progress
    total, done = len(findings), 0
    # Keyed by (ino, blob): a file's current content and a kept version are repaired apart.
    lost = {(f.ino, f.blob) for f in findings if f.kind is Kind.LOST}
    files: dict[tuple[int, int | None], tuple[int | None, set[int], list[Finding]]] = {}
    blobs: dict[int, list[Finding]] = defaultdict(list)
    namespace: list[Finding] = []
    for f in findings:
        if f.kind is Kind.LOST:
            f.fixed, f.fix = False, "left untouched: no good replica to copy from"
        elif f.kind in REPLICA_KINDS and f.ino is not None:
            if (f.ino, f.blob) in lost:
                f.fixed, f.fix = False, "the file is lost"
                continue
            entry = files.setdefault((f.ino, f.blob), (f.blob, set(), []))
            if f.node is not None:
                entry[1].add(f.node)
            entry[2].append(f)
        elif f.kind in BLOB_KINDS:
            blobs[f.node or 0].append(f)
        elif f.kind in NAMESPACE_KINDS:
            namespace.append(f)
    done += sum(1 for f in findings if f.fixed is False)
    progress("repair", done, total)

    items = list(files.items())
    for i in range(0, len(items), FILES_PER_REQUEST):
        batch = items[i:i + FILES_PER_REQUEST]
        reply = await _call(client, "repair_files",
                            files=[[ino, blob, sorted(bad)] for (ino, _), (blob, bad, _) in batch])
        for (_, (_, _, found)), result in zip(batch, reply["results"], strict=True):
            for f in found:
                f.fixed = result["status"] in SETTLED
                f.fix = _describe(result)
            done += len(found)
        progress("repair", done, total)

    for node, found in blobs.items():
        reply = await _call(client, "forget_blobs", node_id=node, blobs=[f.blob for f in found])
        queued = set(reply["queued"])
        kept = {blob: why for blob, why in reply["kept"]}
        for f in found:
            f.fixed = True
            f.fix = "deleted (queued for GC)" if f.blob in queued else \
                f"kept: {kept.get(f.blob, 'in use')} now"
        done += len(found)
        progress("repair", done, total)

    if namespace:
        reply = await _call(
            client, "repair_namespace",
            dangling=[[f.parent, f.name] for f in namespace if f.kind is Kind.DANGLING],
            unlinked=[f.ino for f in namespace if f.kind is Kind.UNLINKED])
        dropped = {(p, bytes(n)) for p, n in reply["dropped"]}
        relinked = {ino: bytes(name) for ino, name in reply["relinked"]}
        for f in namespace:
            f.fixed = True
            if f.kind is Kind.DANGLING:
                f.fix = "entry removed" if (f.parent, f.name) in dropped else "nothing to do now"
            else:
                name = relinked.get(f.ino or 0)
                f.fix = (f"linked as /lost+found/{os.fsdecode(name)}" if name is not None
                         else "nothing to do now")
        done += len(namespace)
        progress("repair", done, total)


async def _call(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    """A repair request: sent once (each fix is its own transaction; a lost reply is settled
    by the next check), with a long timeout (it copies data)."""
    return await client.coordinator.call(op, timeout=REPAIR_TIMEOUT, **fields)


def _describe(result: dict[str, Any]) -> str:
    status, msg = result["status"], result.get("msg") or ""
    if status == "fixed":
        return f"re-replicated: replicas now {result.get('replicas')}"
    if status == "ok":
        return "the copies verified good; nothing to do"
    if status == "moved_on":
        return "the file changed meanwhile; its new version was written in full"
    return f"{status}: {msg}" if msg else status
