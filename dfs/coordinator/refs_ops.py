"""The checker's look at what keeps blobs alive besides current files (docs/checker.md,
"Kept versions and snapshots"): `check_refs` judges the reference counts (dfs/meta/refcheck.py)
in one read, then, with repair, fixes each finding in its own write that re-checks it;
`scan_held` pages through kept versions and snapshots' files, and `held_rows` reads some of
them again, so their copies are checked and repaired like a current file's."""

from __future__ import annotations

import functools
from typing import Any

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore
from dfs.meta.refcheck import RefCheck
from dfs.meta.scan import inode_row
from dfs.rpc import Request

Reply = dict[str, Any]


class RefsOps:
    store: MetaStore

    async def op_check_refs(self, req: Request) -> Reply:
        repair = req.bool("repair", False)
        store = self.store
        refs = RefCheck(store.db, store.namespace.inodes)

        def judge() -> Any:
            with store.db.snapshot() as txn:
                return refs.judge(txn)

        findings, total = await runtime.in_thread(judge)  # a walk of every kept record
        fixed = []
        if repair:
            for f in findings:
                if await store.db.write(
                        functools.partial(refs.repair, f=f, now_ns=runtime.wall_ns())):
                    fixed.append(f.to_json())
        return {"findings": [f.to_json() for f in findings], "total": total, "fixed": fixed}

    async def op_scan_held(self, req: Request) -> Reply:
        """A page of kept versions (`kind` versions) or snapshots' files (snapshots) with a
        blob: rows as `scan_inodes` (the file's ino), each with its `at` (the version, the
        snapshot id), and the key to continue after (nil at the end)."""
        kind, after = req.str("kind"), req.bytes("after", b"")
        limit = req.int("limit", 5000)
        store = self.store
        if kind == "versions":
            rows, last = store.db.read(lambda t: store.scan.versions(t, after, limit))
            out = [[_row(v.ino, v.version, v), v.version] for v in rows if v.blob is not None]
        elif kind == "snapshots":
            files, last = store.db.read(
                lambda t: store.namespace.snapshots.files(t, after, limit))
            out = [[inode_row(f.inode), f.snap] for f in files]
        else:
            raise DfsError(Code.BAD_REQUEST, "scan_held: kind is versions or snapshots")
        return {"rows": out, "last": last}

    async def op_held_rows(self, req: Request) -> Reply:
        """[[kind, ino, at], ...] read again (a checker confirming what it found): each row
        as `scan_held` gives it, or nil if it is gone."""
        keys = req.list("keys")
        ns = self.store.namespace

        def read(t: Any) -> list[Any]:
            out: list[Any] = []
            for kind, ino, at in keys:
                if kind == "versions":
                    v = ns.inodes.versions.find(t, int(ino), int(at))
                    out.append(None if v is None else _row(v.ino, v.version, v))
                else:
                    inode = ns.snapshots.inode(t, int(at), int(ino))
                    out.append(None if inode is None else inode_row(inode))
            return out

        if len(keys) > 10_000 or not all(isinstance(k, list | tuple) and len(k) == 3
                                         for k in keys):
            raise DfsError(Code.BAD_REQUEST, "held_rows: keys are [kind, ino, at], 10,000 at most")
        return {"rows": self.store.db.read(read)}


def _row(ino: int, version: int, v: Any) -> list[Any]:
    """A kept version as a file row: a regular file at that version with its blob."""
    return [ino, 0o100444, 1, version, v.blob, v.size, v.checksum, list(v.replicas), 0]

