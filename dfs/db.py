"""The one LMDB environment of a process and its single group-committing writer.

docs/design.md §5 (LMDB rules, rule 8): every write transaction runs whole inside one
`runtime.in_thread` call made by one writer task. Requests that queue up while a batch is
being written go into the next batch, each in a nested transaction of one outer transaction,
so N concurrent writers share one commit and one forced flush.

Power loss (issue 8 item 5). The environment is opened `sync=True, metasync=False`:
- LMDB documents that `sync=False` (MDB_NOSYNC) lets a system crash corrupt the environment
  unless the filesystem preserves write order, which ext4/xfs do not promise. With
  `metasync=False` (MDB_NOMETASYNC) alone each commit fdatasyncs its data pages before writing
  its meta page, and "a system crash may undo the last committed transaction" while
  "database integrity" is kept (lmdb.h; py-lmdb `Environment` docs). So losing any unforced
  write can undo transactions but never corrupt the environment. The price: every commit
  fdatasyncs (a STAGE batch too) and a durable batch fdatasyncs twice.
- A batch that holds a durable request is followed by `env.sync(True)`, which flushes its meta
  page: a durable write returns only once it survives power loss, as before.
- Nothing a durable batch wrote is observable before that flush: before committing it the
  writer pins a read transaction taken on the old state, and reads on the trio thread use the
  pin until the flush is done (worker-thread reads wait for it). Otherwise a reply could name
  a decision, or a (ino, version) a blob, that a power cut then undoes.
- A batch with no durable request (a node's STAGE, the coordinator's ENDED, ack and GC
  removals) is visible unforced: its loss is harmless by design (a lost STAGE makes the
  prepare fail, a lost ENDED or ack is redone, a lost GC removal is retried).

`install_environments` replaces `lmdb.open` (the simulator runs dfs/sim/lmdb_model.py).

Replacing the file under a running process (a storage node's online compaction,
storage_node/compaction.py): `paused()` holds the writer between batches, and `reopen()`, inside
it, waits for worker-thread readers to finish, lets the caller put a new data.mdb in place, and
reopens the environment on it. Trio-thread reads never span an await, so none is open then.

With a `mirror` (dfs/etcd/mirror.py) every batch is also written to etcd, fenced by the
coordinator's leadership, before the outer LMDB commit; an etcd failure aborts the batch.
The LMDB is then a cache that a leader always rebuilds from etcd, so it is opened without
fsync (sync=False), no batch is flushed and nothing is pinned: a write is durable, on an
etcd quorum, before LMDB shows it to anyone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import lmdb
import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.failpoints import can_fire, failpoint

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256
# A worker-thread read waits at most this long for a durable batch's flush (the flush needs a
# worker thread too: the bound keeps readers that hold every thread from stalling it forever).
WINDOW_WAIT = 5.0
# reopen() gives worker-thread readers this long to finish before it gives up (and the caller
# keeps the old file): a long verify must not stall writes, which are paused meanwhile.
DRAIN_WAIT = 5.0

Opener = Callable[..., Any]
_opener: Opener | None = None


def install_environments(opener: Opener | None) -> Opener | None:
    """Open environments with opener(path, **lmdb.open kwargs) instead of `lmdb.open` (None:
    back to LMDB); returns the previous opener to put back. The simulator installs one."""
    global _opener
    previous, _opener = _opener, opener
    return previous


class WriterStopped(DfsError):
    """The writer task stopped (the process is shutting down, or crashed in the simulator)
    before this write was known to be done: it may or may not have landed, as at a crash."""

    def __init__(self) -> None:
        super().__init__(Code.UNAVAILABLE, "the database writer has stopped")


class Mirror(Protocol):
    """A durable copy that every write batch goes to before the outer commit (the etcd
    mirror implements it). Called in the writer's worker thread, one batch at a time."""

    def begin(self, txn: Any, dbs: dict[str, Any]) -> None:
        """The outer transaction started; raising fails the whole batch."""

    def wrap(self, txn: Any) -> Any:
        """What a request's fn gets instead of its nested transaction (it records)."""

    def admit(self, view: Any, *, divisible: bool = False) -> None:
        """The request's fn returned, inside its nested transaction; raising rolls back
        that request only. `divisible`: its changes are independent of each other (a GC
        sweep) and may be split across several writes of the copy."""

    def flush(self) -> None:
        """Write every admitted request to the copy; raising fails the whole batch."""

    def end(self, committed: bool) -> None:
        """The outer transaction committed, or was aborted."""


class _BatchFailed(Exception):
    """The mirror failed a whole batch: abort the outer transaction (requests hold the error)."""


@dataclass
class _Request:
    fn: Callable[[lmdb.Transaction], Any]
    durable: bool
    divisible: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    resume: trio.Event | None = None  # a pause (see Database.paused), not a write


class Database:
    """An LMDB environment with named sub-databases (docs/design.md §3)."""

    # False plants the simulator's bug "a decision readable before it is forced" (no pin).
    hide_unforced: bool = True

    def __init__(
        self,
        path: Path | str,
        subdbs: list[str],
        *,
        map_size: int = 1 << 30,
        readonly: bool = False,
        mirror: Mirror | None = None,
        cache: bool = False,
    ) -> None:
        self.path = Path(path)
        self.mirror = mirror
        opener = _opener
        if opener is None:
            opener = lmdb.open
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        # See the module docstring: sync=True keeps the environment intact through power loss;
        # metasync=False leaves the meta flush to the env.sync(True) of durable batches.
        self._opener = opener
        self._subdbs = list(subdbs)
        self.open_options: dict[str, Any] = dict(
            map_size=map_size,
            max_dbs=len(subdbs) + 2,
            subdir=True,
            sync=mirror is None and not cache,  # a copy of etcd needs no fsync
            metasync=False,
            readonly=readonly,
            lock=not readonly,
            max_readers=256,
        )
        self.dbs: dict[str, Any] = {}
        self._open()
        self._send, self._recv = trio.open_memory_channel[_Request](10_000)
        # The snapshot trio-thread reads use while a durable batch is committed but not yet
        # flushed; only the trio thread touches it (a txn must not be used by two at once).
        self._pinned: Any = None
        self._window = threading.Condition()
        self._window_open = False
        self._loop_thread: int | None = None
        self._stopped = False  # the writer task ended: writes fail (WriterStopped), not hang
        self._readers = 0  # worker-thread read transactions open (reopen waits for none)
        self._replacing = False  # reopen() is at work: worker-thread readers wait

    def _open(self) -> None:
        self.env = self._opener(str(self.path), **self.open_options)
        if not self.readonly:
            self.env.reader_check()
        self.dbs = {name: self.env.open_db(name.encode(), create=not self.readonly)
                    for name in self._subdbs}

    @property
    def is_lmdb(self) -> bool:
        """Whether this is a real LMDB file (not the simulator's model): its file can be copied."""
        return self._opener is lmdb.open

    def __getitem__(self, name: str) -> Any:
        return self.dbs[name]

    def close(self) -> None:
        self.env.close()

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run fn in a read transaction. LMDB reads are mmap lookups: fine on the trio thread.

        Sees only what is forced or was never meant to be (see the module docstring).
        """
        with self.snapshot() as txn:
            return fn(txn)

    @contextmanager
    def snapshot(self, *, buffers: bool = False) -> Iterator[Any]:
        """A read transaction for code that reads in more than one call (db.read for the rest).

        On the trio thread, during a durable batch's flush, this is the pinned pre-batch
        snapshot (buffers=False whatever was asked); elsewhere a fresh read transaction,
        begun on a worker thread only once no flush is pending.
        """
        if self._pinned is not None and threading.get_ident() == self._loop_thread:
            yield self._pinned
            return
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            with self._window:
                self._window.wait_for(lambda: not self._window_open, timeout=WINDOW_WAIT)
                self._window.wait_for(lambda: not self._replacing)  # the env is being closed
                txn = self.env.begin(buffers=buffers)
                self._readers += 1
            try:
                with txn:
                    yield txn
            finally:
                with self._window:
                    self._readers -= 1
                    self._window.notify_all()
            return
        txn = self.env.begin(buffers=buffers)
        with txn:
            yield txn

    def write_now(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """A synchronous durable write, for start-up code that runs before the writer task."""
        mirror = self.mirror
        if mirror is None:
            with self.env.begin(write=True) as txn:
                result = fn(txn)
            self._sync()
            return result
        committed = False
        try:
            with self.env.begin(write=True) as txn:
                mirror.begin(txn, self.dbs)
                view = mirror.wrap(txn)
                result = fn(view)
                mirror.admit(view)
                mirror.flush()
            committed = True
        finally:
            mirror.end(committed)
        return result

    async def write(self, fn: Callable[[lmdb.Transaction], T], *, durable: bool = True,
                    divisible: bool = False) -> T:
        """Run fn in its own (nested) write transaction of the next batch; return its result.

        An exception raised by fn rolls back fn's changes only and is re-raised here.
        `divisible`: fn's changes are independent of each other (many GC entries, many ended
        records): a mirror may write them in several pieces, where one piece could exceed
        etcd's limits on one transaction. Only such bulk sweeps say so.
        """
        if self._stopped:
            raise WriterStopped()
        req = _Request(fn, durable, divisible)
        await self._send.send(req)
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def run_writer(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The single writer task; run it in the process's nursery."""
        self._loop_thread = threading.get_ident()
        task_status.started()
        batch: list[_Request] = []
        async with self._recv:
            try:
                while True:
                    pause: _Request | None = None
                    first = await self._recv.receive()
                    if first.resume is not None:
                        batch, pause = [], first
                    else:
                        batch = [first]
                    while pause is None and len(batch) < MAX_BATCH:
                        try:
                            req = self._recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        if req.resume is not None:
                            pause = req  # the batch so far is written first
                        else:
                            batch.append(req)
                    if batch:
                        await self._write_batch(batch)
                        for req in batch:
                            req.done.set()
                    batch = []
                    if pause is not None:
                        assert pause.resume is not None
                        pause.done.set()
                        await pause.resume.wait()
            finally:
                self._stop(batch)

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Inside, no write batch runs: every write sent before is committed (and flushed if
        durable); later ones wait in the queue until the block ends."""
        if self._stopped:
            raise WriterStopped()
        req = _Request(lambda txn: None, False, resume=trio.Event())
        assert req.resume is not None
        try:
            await self._send.send(req)
            await req.done.wait()
            if req.error is not None:
                raise req.error
            yield
        finally:
            req.resume.set()

    async def reopen(self, replace: Callable[[], None]) -> bool:
        """Inside paused(): once no worker-thread read is open, call replace() (which puts a
        new data.mdb in place) and reopen the environment on it. False, with replace() not
        called, when readers did not finish within DRAIN_WAIT. An error reopening is
        fail-stop: the file is in place, a restart opens it."""
        with self._window:
            self._replacing = True
        try:
            with trio.move_on_after(DRAIN_WAIT):
                while True:
                    with self._window:
                        if self._readers == 0:
                            break
                    await trio.sleep(0.002)
            with self._window:
                if self._readers:
                    return False
            # From here to the end nothing awaits: no trio-thread read can start either.
            self.open_options["map_size"] = self.env.info()["map_size"]  # grown, maybe
            replace()
            try:
                self.env.close()
                self._open()
            except (lmdb.Error, OSError):
                log.critical("reopening %s after replacing it failed; stopping", self.path,
                             exc_info=True)
                os._exit(70)
            return True
        finally:
            with self._window:
                self._replacing = False
                self._window.notify_all()

    def _stop(self, batch: list[_Request]) -> None:
        """The writer is going (cancelled, or failed): every write it has not finished, and
        every write from now on, fails with WriterStopped. Shielded callers (a repair's
        decision, docs/coordinator.md) would otherwise wait forever for a batch no one runs,
        and the process's shutdown (or the simulator's crash) with them."""
        self._stopped = True
        pending = [req for req in batch if not req.done.is_set()]
        while True:
            try:
                pending.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                break
        for req in pending:
            req.result, req.error = None, WriterStopped()
            req.done.set()

    async def _write_batch(self, batch: list[_Request]) -> None:
        """Commit a batch, then (if it holds a durable request) flush it, hidden until flushed.

        Readers on the trio thread run while the worker commits and flushes, and must see the
        pinned pre-batch snapshot, not the batch. Commit and flush are one worker call unless
        the failpoint between them can fire (tests, the simulator): a thread hop saved per
        durable write.
        """
        pin = self.hide_unforced and self.mirror is None and any(r.durable for r in batch)
        while True:
            if pin:
                self._pin()
            try:
                if can_fire("db.before_flush"):
                    committed = await runtime.in_thread(self._commit_batch, batch)
                    if committed and self._owes_flush(batch):
                        await failpoint("db.before_flush")
                        await runtime.in_thread(self._sync)
                else:  # nothing can stop between the two: one worker-thread hop, not two
                    committed = await runtime.in_thread(self._commit_and_flush, batch)
            finally:
                if pin:
                    self._unpin()
            if committed is not None:
                return
            # Grown here, on the trio thread between batches, where no read transaction of
            # this process is open (py-lmdb's rule for set_mapsize): the pin is gone.
            new_size = self.env.info()["map_size"] * 2
            log.warning("LMDB map full; growing map to %d bytes", new_size)
            self.env.set_mapsize(new_size)

    def _owes_flush(self, batch: list[_Request]) -> bool:
        return self.mirror is None and any(r.durable and r.error is None for r in batch)

    def _commit_and_flush(self, batch: list[_Request]) -> bool | None:
        committed = self._commit_batch(batch)
        if committed and self._owes_flush(batch):
            self._sync()
        return committed

    def _pin(self) -> None:
        self._pinned = self.env.begin(buffers=False)
        with self._window:
            self._window_open = True

    def _unpin(self) -> None:
        txn, self._pinned = self._pinned, None
        with self._window:
            self._window_open = False
            self._window.notify_all()
        try:
            txn.abort()
        except lmdb.Error:  # the environment was closed (or crashed) under a stopping writer
            pass

    def _commit_batch(self, batch: list[_Request]) -> bool | None:
        """Commit one batch; None when the map is full (nothing written: grow and retry),
        False when the commit failed (every request holds the error), True when committed."""
        if self.mirror is not None:
            return self._commit_mirrored(batch, self.mirror)
        try:
            with self.env.begin(write=True) as outer:
                for req in batch:
                    req.error = None
                    try:
                        with self.env.begin(write=True, parent=outer) as inner:
                            req.result = req.fn(inner)
                    except lmdb.MapFullError:
                        raise
                    except Exception as e:  # noqa: BLE001 - handed back to the caller
                        req.error = e
        except lmdb.MapFullError:
            return None
        except lmdb.Error as e:
            self._commit_failed(batch, e)
            return False
        return True

    def _commit_mirrored(self, batch: list[_Request], mirror: Mirror) -> bool | None:
        """_commit_batch with the mirror: each request's changes recorded in its nested
        transaction, all of them written to the mirror before the outer commit."""
        committed = False
        try:
            with self.env.begin(write=True) as outer:
                try:
                    mirror.begin(outer, self.dbs)
                except DfsError as e:
                    self._fail_all(batch, e)
                    raise _BatchFailed() from None
                for req in batch:
                    req.error = None
                    try:
                        with self.env.begin(write=True, parent=outer) as inner:
                            view = mirror.wrap(inner)
                            req.result = req.fn(view)
                            mirror.admit(view, divisible=req.divisible)
                    except lmdb.MapFullError:
                        raise
                    except Exception as e:  # noqa: BLE001 - handed back to the caller
                        req.result, req.error = None, e
                try:
                    mirror.flush()
                except DfsError as e:
                    log.warning("metadata batch of %d not written to etcd: %s", len(batch), e)
                    self._fail_all([r for r in batch if r.error is None], e)
                    raise _BatchFailed() from None
            committed = True
        except _BatchFailed:
            return False
        except lmdb.MapFullError:
            return None
        except lmdb.Error as e:
            self._commit_failed(batch, e)
            return False
        finally:
            mirror.end(committed)
        return True

    @staticmethod
    def _fail_all(batch: list[_Request], error: DfsError) -> None:
        """Every request gets its own copy of error (one instance raised in many tasks would
        pile up their tracebacks); DfsError subclasses differ in their constructors."""
        for req in batch:
            req.result, req.error = None, type(error).__new__(type(error))
            req.error.__dict__.update(error.__dict__)
            req.error.args = error.args

    @staticmethod
    def _commit_failed(batch: list[_Request], e: lmdb.Error) -> None:
        # The outer commit failed (a full disk shows up as ENOSPC or, after a short
        # write, EIO): nothing of the batch was written. Every request gets the error
        # and the writer keeps serving; the environment stays usable.
        log.error("LMDB write batch of %d failed: %s", len(batch), e)
        for req in batch:
            req.result = None
            req.error = type(e)(*e.args)

    def _sync(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error:
            # docs/design.md §5: an fsync error is fail-stop; recovery after restart is the cure.
            log.critical("fsync of %s failed; stopping", self.path, exc_info=True)
            os._exit(70)
