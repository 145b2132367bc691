"""etcd as the durable copy of a Database: every write batch goes to etcd before LMDB commits.

The coordinator keeps its LMDB (dfs/db.py, dfs/meta) as a local cache and runs the same meta
code over it; `Database(..., mirror=EtcdMirror(...))` records what each request's nested
transaction put and deleted (`RecordingTxn`) and, once the batch ran and before the outer
LMDB commit, writes the successful requests' changes to etcd:

- Key layout: `<prefix>/<sub-db>/<raw LMDB key>` -> the LMDB value, byte for byte; plus
  `<prefix>/_mirror`, the chain marker below.
- Whole requests are packed into one etcd txn up to ETCD_MAX_TXN_OPS operations and
  MAX_REQUEST_BYTES (group commit stays); one request's changes are always in one etcd txn,
  so each request is atomic in etcd as in LMDB. A request too big for one etcd txn fails
  alone with TOO_BIG (its nested transaction rolls back).
- Fencing: every etcd txn compares the election key's create_revision with this leader's
  (dfs/etcd/election.py). A failed compare means this process was deposed: the batch fails
  with LostLeadership and every later batch too, without asking etcd again.
- Chain: every etcd txn also compares the marker's mod_revision with the one this process
  last wrote, and rewrites the marker: a write by anyone else under the prefix stops this
  leader too.
- In doubt: an etcd txn that fails in transit (no reply: it may have landed) leaves every
  request of its batch unanswered (`InDoubt`, dfs/errors.py) and deposes this leader, which
  revokes its lease (so a late copy of the txn can no longer land) and steps down: a crash
  right after the write, in effect. Clients settle their lost replies with the next leader,
  which loads what etcd holds. Answering "failed" instead told a client its write failed
  while the next leader committed it, and an abort sent to the nodes lost it (nemesis).
- A refused or failed batch aborts the outer LMDB transaction: nothing is visible locally.
  etcd txns of a batch that landed while the LMDB commit failed are replayed into LMDB at the
  start of the next batch, before any request runs.

`load` rebuilds a Database from etcd at one revision; a leader always starts from it, which
is why the local LMDB needs no fsync at all (dfs/db.py opens it with sync=False): etcd has
fsynced every write on a quorum before LMDB sees it, and a cache lost or torn by a power cut
is thrown away and loaded again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError, InDoubt
from dfs.etcd.client import (
    ETCD_MAX_TXN_OPS,
    MAX_REQUEST_BYTES,
    OP_OVERHEAD,
    Compacted,
    EtcdClient,
    EtcdError,
    LeaseNotFound,
    compare,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from dfs.etcd.election import RENEWALS_PER_TTL, Leadership, LostLeadership

log = logging.getLogger(__name__)

# One request's net changes: (sub-db, raw key) -> new value, or None for a delete.
Changes = dict[tuple[str, bytes], bytes | None]

MARKER = "_mirror"
# Room a txn keeps for the marker put and the two compares (ops and bytes).
RESERVED_OPS = 1
RESERVED_BYTES = 4096
# The most keys one request (one db.write) may change on etcd: callers that touch many keys
# (GC sweeps, purges, bulk repair queueing) chunk their writes by it.
MAX_REQUEST_KEYS = ETCD_MAX_TXN_OPS - RESERVED_OPS
LOAD_PAGE = 2000  # keys per range call while loading
LOAD_ATTEMPTS = 3  # a load that meets a compaction starts over at a newer revision
CACHE_TAG = "ETCD_CACHE"  # marks an LMDB directory as a disposable cache of etcd


def subdb_prefix(prefix: str, name: str) -> bytes:
    return f"{prefix.rstrip('/')}/{name}/".encode()


class _ReadCursor:
    """An LMDB cursor for reading only: a write through it would bypass the recording."""

    _WRITES = frozenset({"put", "putmulti", "delete", "replace", "pop"})

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        if name in self._WRITES:
            raise TypeError(f"cursor.{name} is not mirrored to etcd: use txn.put/txn.delete")
        return getattr(self._cursor, name)

    def __iter__(self) -> Any:
        return iter(self._cursor)

    def __enter__(self) -> _ReadCursor:
        self._cursor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cursor.__exit__(*exc)


class RecordingTxn:
    """A nested LMDB write transaction that records its net puts and deletes by sub-db name.

    The meta code uses get/put/delete/cursor/stat only; anything else fails loudly here
    rather than silently missing etcd.
    """

    def __init__(self, txn: lmdb.Transaction, names: dict[int, str]) -> None:
        self._txn = txn
        self._names = names
        self.changes: Changes = {}

    def _name(self, db: Any) -> str:
        name = self._names.get(id(db)) if db is not None else None
        if name is None:
            raise TypeError("a mirrored write must name one of the Database's sub-dbs")
        return name

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        return self._txn.get(key, default, db=db)

    def put(self, key: bytes, value: bytes, *, db: Any = None, **flags: Any) -> bool:
        name = self._name(db)
        done = self._txn.put(key, value, db=db, **flags)
        if done:
            self.changes[(name, bytes(key))] = bytes(value)
        return done

    def delete(self, key: bytes, value: bytes = b"", db: Any = None) -> bool:
        name = self._name(db)
        done = self._txn.delete(key, value, db=db)
        if done:
            self.changes[(name, bytes(key))] = None
        return done

    def cursor(self, db: Any = None) -> _ReadCursor:
        return _ReadCursor(self._txn.cursor(db=db))

    def stat(self, db: Any) -> dict:
        return self._txn.stat(db)


def _size(prefix: str, changes: Changes) -> int:
    base = len(prefix) + 2 + OP_OVERHEAD
    return sum(base + len(name) + len(key) + len(value or b"")
               for (name, key), value in changes.items())


class EtcdMirror:
    """The etcd copy of one Database, written under one Leadership (see the module doc).

    All methods but `load`/`prepare` are called by the Database, in its writer's worker
    thread (or in `write_now` before the writer runs), one batch at a time.
    """

    def __init__(self, client: EtcdClient, prefix: str, leadership: Leadership, *,
                 max_ops: int = ETCD_MAX_TXN_OPS, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.leadership = leadership
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.deposed = False
        self.deposed_why = "a fenced etcd write was refused: another coordinator leads"
        self.txns_sent = 0  # etcd txns that landed (tests and `dfs status` read it)
        self._marker_key = f"{self.prefix}/{MARKER}".encode()
        self._marker_rev: int | None = None  # the marker's mod_revision as this leader left it
        self._seq = 0
        self._names: dict[int, str] = {}
        self._dbs: dict[str, Any] = {}
        self._admitted: list[Changes] = []
        self._landed: list[Changes] = []  # this batch's etcd txns that landed
        self._unapplied: list[Changes] = []  # landed in etcd, not yet in LMDB (replay them)
        self.in_doubt = False  # an etcd txn was sent and its reply lost: see _send

    # -- setting up a cache -------------------------------------------------------------------

    @staticmethod
    def refuse_non_cache(path: Path) -> None:
        """An LMDB in `path` that is not tagged as a cache of etcd is real metadata: refused."""
        if (path / "data.mdb").exists() and not (path / CACHE_TAG).exists():
            raise DfsError(Code.BAD_REQUEST, f"{path} holds LMDB metadata that is not a cache "
                                             "of etcd; move it to etcd with dfs meta migrate")

    @staticmethod
    def prepare(path: Path | str) -> None:
        """Make `path` an empty cache directory: an old cache of etcd is deleted (a leader
        always reloads); an LMDB there that is not tagged as a cache is refused, not lost."""
        path = Path(path)
        EtcdMirror.refuse_non_cache(path)
        for name in ("data.mdb", "lock.mdb"):
            (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        (path / CACHE_TAG).write_text("this LMDB is a disposable cache of etcd\n")

    def load(self, db: Database) -> int:
        return load(self.client, self.prefix, db, renew=self.renew_if_due)

    def renew_if_due(self) -> None:
        """Between pages of a load: renew the lease once a renewal is due. A namespace of
        10^5 files takes several lease TTLs to load; the leader's keepalive task gets no
        renewal through meanwhile (measured: none in 14 s), so the loader renews it itself."""
        ship = self.leadership
        now = time.monotonic()
        if now - ship.renewed_at < ship.ttl / RENEWALS_PER_TTL:
            return
        try:
            self.client.lease_keepalive(ship.lease_id, timeout=max(0.05, ship.expires_at - now))
        except LeaseNotFound:
            ship.lost = True
            raise LostLeadership("this coordinator's etcd lease has expired") from None
        except EtcdError as e:
            log.warning("lease renewal during the load failed: %s", e.msg)
            return
        ship.renewed_at = now

    # -- the Database's batch protocol (dfs/db.py Mirror) -------------------------------------

    def begin(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        """A batch starts: refuse if deposed (or in doubt); replay what etcd has and LMDB
        lacks into the outer transaction."""
        if self.deposed:
            raise LostLeadership()
        self.leadership.check()
        if not self._names:
            self._dbs = dict(dbs)
            self._names = {id(handle): name for name, handle in dbs.items()}
        self._admitted, self._landed = [], []
        if self._marker_rev is None:
            kv = self.client.get(self._marker_key)
            self._marker_rev = kv.mod_revision if kv is not None else 0
        for changes in self._unapplied:
            self._apply(txn, changes)

    def wrap(self, txn: lmdb.Transaction) -> RecordingTxn:
        return RecordingTxn(txn, self._names)

    def admit(self, view: RecordingTxn, *, divisible: bool = False) -> None:
        """A request finished (inside its nested transaction): keep its changes, or raise
        TOO_BIG so that only this request rolls back. A divisible request's changes are
        independent: kept in pieces that each fit one etcd txn."""
        changes = view.changes
        view.changes = {}
        if not changes:
            return
        ops, size = len(changes), _size(self.prefix, changes)
        too_big = ops + RESERVED_OPS > self.max_ops or size + RESERVED_BYTES > self.max_bytes
        if too_big and divisible:
            self._admitted.extend(self._pieces(changes))
            return
        if too_big:
            raise DfsError(Code.TOO_BIG, f"one metadata change of {ops} keys ({size} bytes) is "
                                         f"over etcd's limits ({self.max_ops} operations, "
                                         f"{self.max_bytes} bytes per transaction)")
        self._admitted.append(changes)

    def flush(self) -> None:
        """Write the admitted requests to etcd, whole requests per txn; raise on failure."""
        for group in self._groups():
            self._send(group)
        self._admitted = []

    def end(self, committed: bool) -> None:
        """The outer LMDB transaction committed (the replays with it) or was aborted."""
        if committed:
            self._unapplied = []
        else:
            self._unapplied.extend(self._landed)
        self._admitted, self._landed = [], []

    # -- internals ----------------------------------------------------------------------------

    def _pieces(self, changes: Changes) -> list[Changes]:
        """A divisible request's changes cut into pieces within the limits of one etcd txn."""
        pieces: list[Changes] = []
        piece: Changes = {}
        size = 0
        for key, value in changes.items():
            extra = _size(self.prefix, {key: value})
            if extra + RESERVED_BYTES > self.max_bytes:
                raise DfsError(Code.TOO_BIG, f"one metadata value of {extra} bytes is over "
                                             f"etcd's {self.max_bytes} bytes per transaction")
            if piece and (len(piece) + 1 + RESERVED_OPS > self.max_ops
                          or size + extra + RESERVED_BYTES > self.max_bytes):
                pieces.append(piece)
                piece, size = {}, 0
            piece[key] = value
            size += extra
        if piece:
            pieces.append(piece)
        return pieces

    def _groups(self) -> list[Changes]:
        groups: list[Changes] = []
        current: Changes = {}
        size = 0
        for changes in self._admitted:
            new_keys = sum(1 for k in changes if k not in current)
            extra = _size(self.prefix, changes)
            if current and (len(current) + new_keys + RESERVED_OPS > self.max_ops
                            or size + extra + RESERVED_BYTES > self.max_bytes):
                groups.append(current)
                current, size = {}, 0
            current.update(changes)  # a later request's value wins, as in LMDB
            size += extra
        if current:
            groups.append(current)
        return groups

    def _key(self, name: str, key: bytes) -> bytes:
        return subdb_prefix(self.prefix, name) + key

    def _compares(self) -> list[dict]:
        return [compare(self.leadership.key, "CREATE", "EQUAL", self.leadership.create_revision),
                compare(self._marker_key, "MOD", "EQUAL", self._marker_rev or 0)]

    def _token(self) -> bytes:
        self._seq += 1
        return f"{self.leadership.create_revision}:{self._seq}".encode()

    def _send(self, group: Changes) -> None:
        token = self._token()
        ops = [op_put(self._key(n, k), v) if v is not None else op_delete(self._key(n, k))
               for (n, k), v in group.items()]
        ops.append(op_put(self._marker_key, token))
        try:
            result = self.client.txn(self._compares(), ops,
                                     [op_range(self.leadership.key), op_range(self._marker_key)])
        except EtcdError as e:
            # Sent or not, landed or not: nobody here can say. Every request of the batch is
            # left unanswered and this leader stops (InDoubt), as if it had crashed after the
            # write: an error reply would tell a client "failed" of a decision that may have
            # landed, and an abort sent to its nodes would contradict it (nemesis, HA seed 9).
            self.in_doubt = self.deposed = True
            self.deposed_why = f"an etcd write is in doubt: {e.msg}"
            raise InDoubt(Code.UNAVAILABLE, self.deposed_why) from None
        if not result.succeeded:
            self._refused(result.responses)
        self._marker_rev = result.revision
        self._landed.append(group)
        self.txns_sent += 1

    def _refused(self, responses: list[dict]) -> None:
        """A compare failed: another leader (fence) or another writer (chain). Either way
        this cache can no longer be trusted: stop writing, step down, reload."""
        self.deposed = True
        self.leadership.lost = True
        leader = _kv(responses, 0)
        if leader.get("create_revision") != str(self.leadership.create_revision):
            raise LostLeadership()
        raise LostLeadership("the metadata in etcd changed under this leader")

    def _apply(self, txn: lmdb.Transaction, changes: Changes) -> None:
        for (name, key), value in changes.items():
            if value is None:
                txn.delete(key, db=self._dbs[name])
            else:
                txn.put(key, value, db=self._dbs[name])


def _kv(responses: list[dict], index: int) -> dict:
    """The first key of a failure branch's range response `index` ({} when absent)."""
    try:
        kvs = responses[index]["response_range"].get("kvs", [])
    except (IndexError, KeyError):
        return {}
    return kvs[0] if kvs else {}


def load(client: EtcdClient, prefix: str, db: Database, *, page: int = LOAD_PAGE,
         renew: Callable[[], None] | None = None) -> int:
    """Replace every sub-db of db with its copy in etcd, all read at one revision; that
    revision. Runs before the writer task (like `Database.write_now`), never through a mirror.
    """
    attempts = 0
    while True:
        try:
            return _load_once(client, prefix, db, page, renew)
        except Compacted:
            attempts += 1
            if attempts >= LOAD_ATTEMPTS:
                raise EtcdError("etcd kept compacting while the metadata was loaded") from None
            log.warning("etcd compacted the revision being loaded; loading again")
        except lmdb.MapFullError:  # nothing was written (the transaction aborted): grow
            db.env.set_mapsize(db.env.info()["map_size"] * 2)


def _load_once(client: EtcdClient, prefix: str, db: Database, page: int,
               renew: Callable[[], None] | None) -> int:
    revision = 0
    with db.env.begin(write=True) as txn:
        for name, handle in db.dbs.items():
            txn.drop(handle, delete=False)
            start = subdb_prefix(prefix, name)
            skip, end, key = len(start), prefix_end(start), start
            while True:
                result = client.range(key, end, limit=page, revision=revision)
                revision = revision or result.revision
                for kv in result.kvs:
                    txn.put(kv.key[skip:], kv.value, db=handle, append=True)
                if renew is not None:
                    renew()
                if not result.more or not result.kvs:
                    break
                key = result.kvs[-1].key + b"\x00"
    db.env.sync(True)
    return revision
