"""Shared helpers for the metadata tests: a store on real LMDB and synchronous call wrappers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb

from dfs.meta import SUBDBS, MetaStore

GRACE = 60 * 10**9
NOW = 1_000 * 10**9


class Sync:
    """Calls a meta component's methods each in its own durable write transaction, the way
    the server's `db.write(lambda txn: ...)` does (a raising call rolls back)."""

    def __init__(self, store: MetaStore, component: Any) -> None:
        self._store = store
        self._component = component

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._component, name)
        return lambda *a, **k: self._store.db.write_now(lambda txn: method(txn, *a, **k))


def open_store(path: Path, **kwargs: Any) -> MetaStore:
    return MetaStore.open(path, gc_grace_ns=GRACE, map_size=1 << 24, **kwargs)


def dump(store: MetaStore) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every key and value of every sub-database: to prove a failed op changed nothing."""

    def read(txn: lmdb.Transaction) -> dict[str, list[tuple[bytes, bytes]]]:
        out = {}
        for name in SUBDBS:
            with txn.cursor(db=store.db[name]) as cur:
                out[name] = list(cur)
        return out

    return store.db.read(read)
