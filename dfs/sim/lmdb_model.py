"""An in-memory stand-in for the part of py-lmdb that dfs uses, on disks that lose unforced commits.

The simulator installs `SimDisks.open` with `dfs.db.install_environments`; every `Database`
then runs on a `SimEnvironment` instead of a real LMDB environment. What the model keeps:

- MVCC like LMDB: a read transaction sees the state as of its begin, whatever commits after;
  one top-level write transaction at a time; nested write transactions whose abort undoes
  only themselves; keys ordered bytewise; named sub-databases listed in the main database.
- A disk per path that outlives the processes using it. `env.sync(True)` forces: everything
  committed so far survives a crash. `SimDisks.crash(path, rng)` is a power cut of that
  machine: every commit after the last force is lost, or, given a `random.Random`, all but a
  random suffix of them (LMDB with `metasync=False` may keep some unforced commits). The next
  open of the path starts from what survived.
- `SimDisks.set_full(path, True)`: a full disk; top-level commits then fail like LMDB's on
  ENOSPC (`lmdb.DiskError`, "No space left on device") and write nothing.

Values come back as bytes whatever `buffers` says; page counts in `stat` are estimates from
the bytes stored. Every error raised is a real `lmdb.Error` subclass, so callers' handlers run.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Iterator
from typing import Any

import lmdb

MAX_KEY = 511
PAGE = 4096
NODE_OVERHEAD = 8  # bytes LMDB spends per leaf node, for the page estimate
_DB_RECORD = b"\x00" * 48  # what the main database holds for a named database
Name = bytes | None  # None is the main database


def _key(key: Any, what: str) -> bytes:
    key = bytes(key)
    if not 0 < len(key) <= MAX_KEY:
        raise lmdb.BadValsizeError(f"{what}: MDB_BAD_VALSIZE: Unsupported size of key")
    return key


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
        self.writer: Transaction | None = None
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


class SimDisks:
    """Every simulated disk of one simulated world, by path. `open` is the environment opener.

    strict=True (the default): only `env.sync(True)` forces, so a crash may lose every commit
    since, which is all dfs may rely on. strict=False follows LMDB's own flags instead
    (sync=True makes each commit force the one before it).
    """

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.disks: dict[str, SimDisk] = {}

    def open(self, path: str, *, map_size: int = 10 << 20, readonly: bool = False,
             max_dbs: int = 0, sync: bool = True, metasync: bool = True,
             **_ignored: Any) -> SimEnvironment:
        path = str(path)
        disk = self.disks.get(path)
        if disk is None:
            if readonly:
                raise lmdb.Error(f"{path}: No such file or directory")
            disk = self.disks[path] = SimDisk(self.strict)
        disk.map_size = max(disk.map_size, map_size)
        return SimEnvironment(disk, path, readonly=readonly, max_dbs=max_dbs, sync=sync,
                              metasync=metasync)

    def crash(self, path: str, rng: random.Random | None = None) -> int:
        """Power cut for path: unforced commits are lost, open environments die.

        Returns how many commits were lost. A path never opened loses nothing.
        """
        disk = self.disks.get(str(path))
        return disk.crash(rng) if disk is not None else 0

    def set_full(self, path: str, full: bool) -> None:
        """Make the disk of path full (commits fail with ENOSPC) or give it room again."""
        self.disks[str(path)].full = full

    def unforced(self, path: str) -> int:
        """Commits on path that a crash now would lose (with rng=None)."""
        return self.disks[str(path)].unforced


class _Db:
    """A database handle, as `env.open_db` returns it."""

    __slots__ = ("name",)

    def __init__(self, name: Name) -> None:
        self.name = name


class SimEnvironment:
    """The py-lmdb `Environment` subset dfs uses, over one SimDisk."""

    def __init__(self, disk: SimDisk, path: str, *, readonly: bool, max_dbs: int, sync: bool,
                 metasync: bool) -> None:
        self.disk = disk
        self._path = path
        self.readonly = readonly
        self.max_dbs = max_dbs
        self.sync_flag, self.metasync_flag = sync, metasync
        self.epoch = disk.epoch
        self.closed = False
        self.main = _Db(None)

    def check(self) -> None:
        if self.closed or self.epoch != self.disk.epoch:
            raise lmdb.Error("Attempt to operate on closed/deleted/dropped object.")

    def path(self) -> str:
        return self._path

    def __enter__(self) -> SimEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed and self.epoch == self.disk.epoch and self.disk.writer is not None \
                and self.disk.writer.env is self:
            self.disk.writer = None
        self.closed = True

    def begin(self, db: _Db | None = None, parent: Transaction | None = None,
              write: bool = False, buffers: bool = False) -> Transaction:
        self.check()
        if write and self.readonly:
            raise lmdb.ReadonlyError("mdb_txn_begin: Permission denied")
        return Transaction(self, db or self.main, parent, write)

    def open_db(self, key: bytes | None = None, txn: Transaction | None = None,
                create: bool = True, **_flags: Any) -> _Db:
        self.check()
        if key is None:
            return self.main
        name = _key(key, "mdb_dbi_open")
        if name in self.disk.stores or (txn is not None and txn._created(name)):
            return _Db(name)
        if not create or self.readonly:
            raise lmdb.NotFoundError("mdb_dbi_open: MDB_NOTFOUND: No matching key/data pair found")
        if len(self.disk.stores) - 1 >= self.max_dbs:
            raise lmdb.DbsFullError("mdb_dbi_open: MDB_DBS_FULL: Environment maxdbs limit reached")
        own = txn is None
        t = txn if txn is not None else self.begin(write=True)
        t.put(name, _DB_RECORD, db=self.main)
        t.created.add(name)
        if own:
            t.commit()
        return _Db(name)

    def sync(self, force: bool = False) -> None:
        self.check()
        if force or self.sync_flag:
            self.disk.force()

    def info(self) -> dict[str, int]:
        self.check()
        return {"map_addr": 0, "map_size": self.disk.map_size, "last_pgno": 0,
                "last_txnid": self.disk.version, "max_readers": 126,
                "num_readers": sum(self.disk.readers.values())}

    def stat(self) -> dict[str, int]:
        with self.begin() as txn:
            return txn.stat(self.main)

    def set_mapsize(self, map_size: int) -> None:
        self.check()
        self.disk.map_size = map_size

    def reader_check(self) -> int:
        return 0

    def max_key_size(self) -> int:
        return MAX_KEY


class Transaction:
    """A read or (nested) write transaction; a write one buffers changes until commit."""

    def __init__(self, env: SimEnvironment, db: _Db, parent: Transaction | None,
                 write: bool) -> None:
        disk = env.disk
        self.env, self.disk, self.db, self.parent, self.write = env, disk, db, parent, write
        self.changes: dict[Name, dict[bytes, bytes | None]] = {}
        self.sorted: dict[Name, list[bytes]] = {}
        self.deltas: dict[Name, list[int]] = {}  # [entries, bytes] this txn adds
        self.created: set[bytes] = set()
        self.child: Transaction | None = None
        self.done = False
        if parent is not None:
            if not write or not parent.write:
                raise lmdb.InvalidParameterError("mdb_txn_begin: nested read transaction")
            parent.check()
            if parent.child is not None:
                raise lmdb.BadTxnError("mdb_txn_begin: MDB_BAD_TXN: parent has a child")
            parent.child = self
            self.version = parent.version
        elif write:
            if disk.writer is not None:
                raise lmdb.Error("mdb_txn_begin: a second write transaction would deadlock")
            disk.writer = self
            self.version = disk.version
        else:
            self.version = disk.version
            disk.readers[self.version] += 1

    # ---------------------------------------------------------------- life cycle

    def check(self, writing: bool = False) -> None:
        self.env.check()
        if self.done:
            raise lmdb.Error("Attempt to operate on closed/deleted/dropped object.")
        if self.child is not None:
            raise lmdb.BadTxnError("MDB_BAD_TXN: Transaction has a child")
        if writing and not self.write:
            raise lmdb.ReadonlyError("mdb_put: Permission denied")

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def id(self) -> int:
        return self.version

    def commit(self) -> None:
        if self.done:
            return
        self.check()
        if self.parent is not None:
            self._merge_into(self.parent)
        elif self.write:
            if self.disk.full and self.changes:
                self._end()
                raise lmdb.DiskError("mdb_txn_commit: No space left on device")
            self.disk.commit(self.changes, self.deltas, self.created, self.env.sync_flag,
                             self.env.metasync_flag)
        self._end()

    def abort(self) -> None:
        if not self.done:
            if self.child is not None:
                self.child.abort()
            self._end()

    def _end(self) -> None:
        self.done = True
        if self.parent is not None:
            self.parent.child = None
        elif self.write:
            if self.disk.writer is self:
                self.disk.writer = None
        elif self.env.epoch == self.disk.epoch:
            self.disk.readers[self.version] -= 1
            if not self.disk.readers[self.version]:
                del self.disk.readers[self.version]

    def _merge_into(self, parent: Transaction) -> None:
        for name, changes in self.changes.items():
            for key, value in changes.items():
                parent._record(name, key, value)
            pd = parent.deltas.setdefault(name, [0, 0])
            d = self.deltas.get(name, [0, 0])
            pd[0] += d[0]
            pd[1] += d[1]
        parent.created |= self.created

    # ---------------------------------------------------------------- lookups

    def _name(self, db: _Db | None) -> Name:
        name = (db or self.db).name
        if name is not None and name not in self.disk.stores and not self._created(name):
            raise lmdb.BadDbiError("MDB_BAD_DBI: The specified DBI handle was closed/changed")
        return name

    def _created(self, name: bytes) -> bool:
        txn: Transaction | None = self
        while txn is not None:
            if name in txn.created:
                return True
            txn = txn.parent
        return False

    def lookup(self, name: Name, key: bytes) -> bytes | None:
        txn: Transaction | None = self
        while txn is not None:
            changes = txn.changes.get(name)
            if changes is not None and key in changes:
                return changes[key]
            txn = txn.parent
        store = self.disk.stores.get(name)
        return store.value_at(key, self.version) if store is not None else None

    def _levels(self, name: Name) -> list[list[bytes]]:
        levels = []
        txn: Transaction | None = self
        while txn is not None:
            if name in txn.sorted:
                levels.append(txn.sorted[name])
            txn = txn.parent
        store = self.disk.stores.get(name)
        if store is not None:
            levels.append(store.keys)
        return levels

    def seek(self, name: Name, key: bytes | None, after: bool) -> tuple[bytes, bytes] | None:
        """The first live (key, value) at or after key (strictly after if after); None at the end."""
        levels = self._levels(name)
        while True:
            best: bytes | None = None
            for keys in levels:
                if key is None:
                    i = 0
                else:
                    i = bisect_right(keys, key) if after else bisect_left(keys, key)
                if i < len(keys) and (best is None or keys[i] < best):
                    best = keys[i]
            if best is None:
                return None
            value = self.lookup(name, best)
            if value is not None:
                return best, value
            key, after = best, True

    def seek_back(self, name: Name, key: bytes | None, before: bool) -> tuple[bytes, bytes] | None:
        """The last live (key, value) at or before key (strictly before if before)."""
        levels = self._levels(name)
        while True:
            best: bytes | None = None
            for keys in levels:
                if key is None:
                    i = len(keys)
                else:
                    i = bisect_left(keys, key) if before else bisect_right(keys, key)
                if i > 0 and (best is None or keys[i - 1] > best):
                    best = keys[i - 1]
            if best is None:
                return None
            value = self.lookup(name, best)
            if value is not None:
                return best, value
            key, before = best, True

    # ---------------------------------------------------------------- the py-lmdb API

    def get(self, key: Any, default: Any = None, db: _Db | None = None) -> Any:
        self.check()
        value = self.lookup(self._name(db), _key(key, "mdb_get"))
        return default if value is None else value

    def put(self, key: Any, value: Any, dupdata: bool = False, overwrite: bool = True,
            append: bool = False, db: _Db | None = None) -> bool:
        self.check(writing=True)
        name, key, value = self._name(db), _key(key, "mdb_put"), bytes(value)
        old = self.lookup(name, key)
        if old is not None and not overwrite:
            return False
        grow = len(value) - (len(old) if old is not None else -len(key) - NODE_OVERHEAD)
        if grow > 0 and self._size() + grow > self.disk.map_size:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached")
        self._record(name, key, value)
        self._count(name, old, key, value)
        return True

    def replace(self, key: Any, value: Any, db: _Db | None = None) -> bytes | None:
        old = self.get(key, db=db)
        self.put(key, value, db=db)
        return old

    def pop(self, key: Any, db: _Db | None = None) -> bytes | None:
        old = self.get(key, db=db)
        if old is not None:
            self.delete(key, db=db)
        return old

    def delete(self, key: Any, value: Any = b"", db: _Db | None = None) -> bool:
        self.check(writing=True)
        name, key = self._name(db), _key(key, "mdb_del")
        old = self.lookup(name, key)
        if old is None or (value and bytes(value) != old):
            return False
        self._record(name, key, None)
        self._count(name, old, key, None)
        return True

    def stat(self, db: _Db) -> dict[str, int]:
        self.check()
        name = self._name(db)
        store = self.disk.stores.get(name)
        entries, size = store.stat_at(self.version) if store is not None else (0, 0)
        txn: Transaction | None = self
        while txn is not None:
            d = txn.deltas.get(name, [0, 0])
            entries, size = entries + d[0], size + d[1]
            txn = txn.parent
        return {"psize": PAGE, "depth": 1 if entries else 0, "branch_pages": 0,
                "leaf_pages": -(-size // PAGE), "overflow_pages": 0, "entries": entries}

    def cursor(self, db: _Db | None = None) -> Cursor:
        self.check()
        return Cursor(self, self._name(db))

    def _record(self, name: Name, key: bytes, value: bytes | None) -> None:
        changes = self.changes.setdefault(name, {})
        if key not in changes:
            insort(self.sorted.setdefault(name, []), key)
        changes[key] = value

    def _count(self, name: Name, old: bytes | None, key: bytes, new: bytes | None) -> None:
        d = self.deltas.setdefault(name, [0, 0])
        if old is not None:
            d[0] -= 1
            d[1] -= len(key) + len(old) + NODE_OVERHEAD
        if new is not None:
            d[0] += 1
            d[1] += len(key) + len(new) + NODE_OVERHEAD

    def _size(self) -> int:
        size = self.disk.size(self.version)
        txn: Transaction | None = self
        while txn is not None:
            size += sum(d[1] for d in txn.deltas.values())
            txn = txn.parent
        return size


class Cursor:
    """A py-lmdb cursor: a position by key, so changes made through the txn never confuse it.

    Where an unpositioned LMDB cursor's answer depends on its hidden internal position (prev()
    after running off the end, next() after running off the start or after a set_key miss),
    the model raises NotImplementedError rather than guess; dfs never asks.
    """

    def __init__(self, txn: Transaction, name: Name) -> None:
        self.txn, self.name = txn, name
        self._item: tuple[bytes, bytes] | None = None
        # Unpositioned: "fresh", "end" (next() stays False), "start" (prev() stays False),
        # "empty" (both stay False) or "lost" (a set_key miss).
        self._off = "fresh"

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._item = None

    def _go(self, item: tuple[bytes, bytes] | None, off: str = "end") -> bool:
        self._item = item
        if item is None:
            self._off = off
        return item is not None

    def key(self) -> bytes:
        return self._item[0] if self._item else b""

    def value(self) -> bytes:
        return self._item[1] if self._item else b""

    def item(self) -> tuple[bytes, bytes]:
        return self._item if self._item else (b"", b"")

    def first(self) -> bool:
        self.txn.check()
        return self._go(self.txn.seek(self.name, None, False), "empty")

    def last(self) -> bool:
        self.txn.check()
        return self._go(self.txn.seek_back(self.name, None, False), "empty")

    def next(self) -> bool:
        self.txn.check()
        if self._item is not None:
            return self._go(self.txn.seek(self.name, self._item[0], True), "end")
        if self._off == "fresh":
            return self.first()
        if self._off in ("end", "empty"):
            return False
        raise NotImplementedError(f"next() of a cursor left {self._off}: not modelled")

    def prev(self) -> bool:
        self.txn.check()
        if self._item is not None:
            return self._go(self.txn.seek_back(self.name, self._item[0], True), "start")
        if self._off == "fresh":
            return self.last()
        if self._off in ("start", "empty"):
            return False
        raise NotImplementedError(f"prev() of a cursor left {self._off}: not modelled")

    def set_key(self, key: Any) -> bool:
        self.txn.check()
        key = _key(key, "mdb_cursor_get")
        value = self.txn.lookup(self.name, key)
        return self._go((key, value) if value is not None else None, "lost")

    def set_range(self, key: Any) -> bool:
        self.txn.check()
        key = bytes(key)
        if not key:
            return self.first()
        return self._go(self.txn.seek(self.name, _key(key, "mdb_cursor_get"), False), "end")

    def get(self, key: Any, default: Any = None) -> Any:
        return self.value() if self.set_key(key) else default

    def put(self, key: Any, value: Any, dupdata: bool = False, overwrite: bool = True,
            append: bool = False) -> bool:
        db = _Db(self.name)
        done = self.txn.put(key, value, overwrite=overwrite, db=db)
        self.set_key(key)
        return done

    def delete(self, dupdata: bool = False) -> bool:
        """Delete the current item and move to the next one; False when not positioned."""
        self.txn.check(writing=True)
        if self._item is None:
            return False
        key = self._item[0]
        self.txn.delete(key, db=_Db(self.name))
        self._go(self.txn.seek(self.name, key, True), "end")
        return True

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        if self._item is None:
            self.first()
        while self._item is not None:
            k, v = self._item
            yield (k, v) if keys and values else k if keys else v
            self.next()

    def iterprev(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        if self._item is None:
            self.last()
        while self._item is not None:
            k, v = self._item
            yield (k, v) if keys and values else k if keys else v
            self.prev()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.iternext()
