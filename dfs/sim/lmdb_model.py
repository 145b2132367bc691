"""An in-memory stand-in for the part of py-lmdb that dfs uses, on disks that lose unforced commits.

The simulator installs `SimDisks.open` with `dfs.db.install_environments`; every `Database`
then runs on a `SimEnvironment` instead of a real LMDB environment. What the model keeps:

- MVCC like LMDB: a read transaction sees the state as of its begin, whatever commits after;
  one top-level write transaction at a time; nested write transactions whose abort undoes
  only themselves; keys ordered bytewise; named sub-databases listed in the main database.
- A disk per path that outlives the processes using it. `env.sync(True)` forces: everything
  committed so far survives a crash. `SimDisks.crash(path, rng)` is a power cut of that
  machine: every commit after the last force is lost, or, given a `random.Random`, a seeded
  random suffix of them (LMDB with `metasync=False` may keep some unforced commits). The next
  open of the path starts from what survived.
- `SimDisks.set_full(path, True)`: a full disk; top-level commits then fail like LMDB's on
  ENOSPC (`lmdb.DiskError`, "No space left on device") and write nothing.

Values come back as bytes whatever `buffers` says; page counts in `stat` are estimates from
the bytes stored. Every error raised is a real `lmdb.Error` subclass, so callers' handlers run.
The model is not thread-safe: run it with a `runtime.Host` whose `in_thread` calls inline,
after a checkpoint (or a seeded virtual sleep) so other tasks can run between a durable
batch's commit and its flush. tests/test_lmdb_model.py checks the model against py-lmdb.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right, insort
from typing import Any

import lmdb

from dfs.sim.lmdb_cursor import Cursor
from dfs.sim.lmdb_disk import (
    DB_RECORD,
    MAX_KEY,
    NODE_OVERHEAD,
    PAGE,
    DbHandle,
    Name,
    SimDisk,
    check_key,
)


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
        self.main = DbHandle(None)

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

    def begin(self, db: DbHandle | None = None, parent: Transaction | None = None,
              write: bool = False, buffers: bool = False) -> Transaction:
        self.check()
        if write and self.readonly:
            raise lmdb.ReadonlyError("mdb_txn_begin: Permission denied")
        return Transaction(self, db or self.main, parent, write)

    def open_db(self, key: bytes | None = None, txn: Transaction | None = None,
                create: bool = True, **_flags: Any) -> DbHandle:
        self.check()
        if key is None:
            return self.main
        name = check_key(key, "mdb_dbi_open")
        if name in self.disk.stores or (txn is not None and txn._created(name)):
            return DbHandle(name)
        if not create or self.readonly:
            raise lmdb.NotFoundError("mdb_dbi_open: MDB_NOTFOUND: No matching key/data pair found")
        if len(self.disk.stores) - 1 >= self.max_dbs:
            raise lmdb.DbsFullError("mdb_dbi_open: MDB_DBS_FULL: Environment maxdbs limit reached")
        own = txn is None
        t = txn if txn is not None else self.begin(write=True)
        t.put(name, DB_RECORD, db=self.main)
        t.created.add(name)
        if own:
            t.commit()
        return DbHandle(name)

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

    def __init__(self, env: SimEnvironment, db: DbHandle, parent: Transaction | None,
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

    def _name(self, db: DbHandle | None) -> Name:
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

    def get(self, key: Any, default: Any = None, db: DbHandle | None = None) -> Any:
        self.check()
        value = self.lookup(self._name(db), check_key(key, "mdb_get"))
        return default if value is None else value

    def put(self, key: Any, value: Any, dupdata: bool = False, overwrite: bool = True,
            append: bool = False, db: DbHandle | None = None) -> bool:
        self.check(writing=True)
        name, key, value = self._name(db), check_key(key, "mdb_put"), bytes(value)
        old = self.lookup(name, key)
        if old is not None and not overwrite:
            return False
        grow = len(value) - (len(old) if old is not None else -len(key) - NODE_OVERHEAD)
        if grow > 0 and self._size() + grow > self.disk.map_size:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached")
        self._record(name, key, value)
        self._count(name, old, key, value)
        return True

    def replace(self, key: Any, value: Any, db: DbHandle | None = None) -> bytes | None:
        old = self.get(key, db=db)
        self.put(key, value, db=db)
        return old

    def pop(self, key: Any, db: DbHandle | None = None) -> bytes | None:
        old = self.get(key, db=db)
        if old is not None:
            self.delete(key, db=db)
        return old

    def delete(self, key: Any, value: Any = b"", db: DbHandle | None = None) -> bool:
        self.check(writing=True)
        name, key = self._name(db), check_key(key, "mdb_del")
        old = self.lookup(name, key)
        if old is None or (value and bytes(value) != old):
            return False
        self._record(name, key, None)
        self._count(name, old, key, None)
        return True

    def stat(self, db: DbHandle) -> dict[str, int]:
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

    def cursor(self, db: DbHandle | None = None) -> Cursor:
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
