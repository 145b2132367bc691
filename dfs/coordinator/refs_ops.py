"""`check_refs`: the checker's look at the reference counts (dfs/meta/refcheck.py): judged in
one read, then, with repair, each finding fixed in its own write that re-checks it."""

from __future__ import annotations

import functools
from typing import Any

from dfs import runtime
from dfs.meta import MetaStore
from dfs.meta.refcheck import RefCheck
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
