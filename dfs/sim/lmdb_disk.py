"""What a simulated LMDB disk holds: every database's key history, the forced version, readers.

dfs/sim/lmdb_model.py puts the py-lmdb API on top; a crash (`SimDisk.crash`) truncates every
history back to what was forced (plus, given a seeded rng, some later commits).
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from typing import Any

import lmdb

MAX_KEY = 511
PAGE = 4096
NODE_OVERHEAD = 8  # bytes LMDB spends per leaf node, for the page estimate
DB_RECORD = b"\x00" * 48  # what the main database holds for a named database
Name = bytes | None  # None is the main database


def check_key(key: Any, what: str) -> bytes:
    key = bytes(key)
    if not 0 < len(key) <= MAX_KEY:
        raise lmdb.BadValsizeError(f"{what}: MDB_BAD_VALSIZE: Unsupported size of key")
    return key


class DbHandle:
    """A database handle, as `env.open_db` returns it."""

    __slots__ = ("name",)

    def __init__(self, name: Name) -> None:
        self.name = name


class _Store:
    """One database on a disk: each key's history of (version, value or None = deleted)."""

    def __init__(self) -> None:
        self.history: dict[bytes, list[tuple[int, bytes | None]]] = {}
        self.keys: list[bytes] = []  # sorted; every key that has a history
        self.stats: list[tuple[int, int, int]] = [(0, 0, 0)]  # (version, entries, bytes)

    def value_at(self, key: bytes, version: int) -> bytes | None:
        hist = self.history.get(key)
        if not hist:
            return None
        i = bisect_right(hist, version, key=lambda e: e[0])
        return hist[i - 1][1] if i else None

    def stat_at(self, version: int) -> tuple[int, int]:
        i = bisect_right(self.stats, version, key=lambda e: e[0])
        return self.stats[i - 1][1], self.stats[i - 1][2]

    def apply(self, version: int, changes: dict[bytes, bytes | None], delta: list[int]) -> None:
        for key, value in changes.items():
            hist = self.history.get(key)
            if hist is None:
                hist = self.history[key] = []
                insort(self.keys, key)
            hist.append((version, value))
        entries, size = self.stats[-1][1:]
        self.stats.append((version, entries + delta[0], size + delta[1]))

    def prune(self, key: bytes, floor: int) -> bool:
        """Forget versions of key no snapshot at or above floor needs; True when fully pruned."""
        hist = self.history.get(key)
        if hist is None:
            return True
        i = bisect_right(hist, floor, key=lambda e: e[0])
        if i > 1:
            del hist[: i - 1]
        if len(hist) == 1 and hist[0][0] <= floor and hist[0][1] is None:
            self._forget(key)
            return True
        return len(hist) == 1 and hist[0][0] <= floor

    def prune_stats(self, floor: int) -> None:
        i = bisect_right(self.stats, floor, key=lambda e: e[0])
        if i > 1:
            del self.stats[: i - 1]

    def truncate(self, key: bytes, version: int) -> None:
        """Drop what key became after version (a crash undid it)."""
        hist = self.history.get(key)
        if hist is None:
            return
        i = bisect_right(hist, version, key=lambda e: e[0])
        del hist[i:]
        if not hist:
            self._forget(key)

    def _forget(self, key: bytes) -> None:
        del self.history[key]
        del self.keys[bisect_left(self.keys, key)]


class SimDisk:
    """What one path holds: committed versions, the last forced one, and the live snapshots."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.stores: dict[Name, _Store] = {None: _Store()}
        self.version = 0  # last committed
        self.forced = 0  # last version that survives any crash
        self.readers: Counter[int] = Counter()  # versions held by open read transactions
        self.writer: Any = None  # the open top-level write Transaction
        self.touched: set[tuple[Name, bytes]] = set()  # keys that may hold extra history
        self.full = False
        self.epoch = 0  # bumped by a crash: environments of an older epoch are dead
        self.map_size = 0

    @property
    def unforced(self) -> int:
        return self.version - self.forced

    def size(self, version: int) -> int:
        return sum(store.stat_at(version)[1] for store in self.stores.values())

    def commit(self, changes: dict[Name, dict[bytes, bytes | None]],
               deltas: dict[Name, list[int]], created: set[bytes], sync: bool,
               metasync: bool) -> None:
        if not changes:
            return  # LMDB writes nothing for a clean write transaction
        version = self.version + 1
        for name in created:
            self.stores.setdefault(name, _Store())
        for name, store_changes in changes.items():
            if name not in self.stores:  # created by this commit (its main-db record is in it)
                self.stores[name] = _Store()
            self.stores[name].apply(version, store_changes, deltas.get(name, [0, 0]))
            self.touched.update((name, k) for k in store_changes)
        self.version = version
        if not self.strict and sync:
            # Real LMDB with sync=True fdatasyncs each commit's pages, which also flushes the
            # previous commit's meta page; metasync=True flushes this commit's meta too.
            self.forced = max(self.forced, version if metasync else version - 1)
            self.prune()

    def force(self) -> None:
        self.forced = self.version
        self.prune()

    def prune(self) -> None:
        floor = min(self.forced, min(self.readers) if self.readers else self.version)
        self.touched = {(n, k) for n, k in self.touched
                        if n in self.stores and not self.stores[n].prune(k, floor)}
        for store in self.stores.values():
            store.prune_stats(floor)

    def crash(self, rng: random.Random | None) -> int:
        """Lose the unforced commits (all, or with rng a random suffix); return how many."""
        keep = rng.randint(0, self.unforced) if rng is not None else 0
        survived = self.forced + keep
        lost = self.version - survived
        for name, key in self.touched:
            if name in self.stores:
                self.stores[name].truncate(key, survived)
        for store in self.stores.values():
            store.stats = store.stats[: bisect_right(store.stats, survived, key=lambda e: e[0])]
        main = self.stores[None]
        for name in [n for n in self.stores if n is not None]:
            if main.value_at(name, survived) is None:
                del self.stores[name]
        self.version = self.forced = survived
        self.readers.clear()
        self.writer = None
        self.epoch += 1
        self.prune()
        return lost
