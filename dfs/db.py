"""The one LMDB environment of a process and its single group-committing writer.

DESIGN.md §5 (LMDB rules, rule 8): every write transaction runs whole inside one
`trio.to_thread.run_sync` call made by one writer task. Requests that queue up while a batch
is being written go into the next batch, each in a nested transaction of one outer
transaction, so N concurrent writers share one fsync. A batch that holds no durable request
is committed without fsync (a storage node's STAGE, DESIGN.md §5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import trio

from dfs import runtime

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256


@dataclass
class _Request:
    fn: Callable[[lmdb.Transaction], Any]
    durable: bool
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class Database:
    """An LMDB environment with named sub-databases (DESIGN.md §3)."""

    def __init__(
        self,
        path: Path | str,
        subdbs: list[str],
        *,
        map_size: int = 1 << 30,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        # sync=False: commits write pages without fsync; durable batches call env.sync(True).
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=len(subdbs) + 2,
            subdir=True,
            sync=False,
            metasync=False,
            readonly=readonly,
            lock=not readonly,
            max_readers=256,
        )
        if not readonly:
            self.env.reader_check()
        self.dbs: dict[str, Any] = {}
        for name in subdbs:
            self.dbs[name] = self.env.open_db(name.encode(), create=not readonly)
        self._send, self._recv = trio.open_memory_channel[_Request](10_000)

    def __getitem__(self, name: str) -> Any:
        return self.dbs[name]

    def close(self) -> None:
        self.env.close()

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run fn in a read transaction. LMDB reads are mmap lookups: fine on the trio thread."""
        with self.env.begin(buffers=False) as txn:
            return fn(txn)

    def write_now(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """A synchronous durable write, for start-up code that runs before the writer task."""
        with self.env.begin(write=True) as txn:
            result = fn(txn)
        self._sync()
        return result

    async def write(self, fn: Callable[[lmdb.Transaction], T], *, durable: bool = True) -> T:
        """Run fn in its own (nested) write transaction of the next batch; return its result.

        An exception raised by fn rolls back fn's changes only and is re-raised here.
        """
        req = _Request(fn, durable)
        await self._send.send(req)
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def run_writer(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The single writer task; run it in the process's nursery."""
        task_status.started()
        async with self._recv:
            while True:
                batch = [await self._recv.receive()]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                while not await runtime.in_thread(self._run_batch, batch):
                    # Grown here, on the trio thread between batches, where no read
                    # transaction of this process is open (py-lmdb's rule for set_mapsize).
                    new_size = self.env.info()["map_size"] * 2
                    log.warning("LMDB map full; growing map to %d bytes", new_size)
                    self.env.set_mapsize(new_size)
                for req in batch:
                    req.done.set()

    def _run_batch(self, batch: list[_Request]) -> bool:
        """Write one batch; False when the map is full (nothing written; grow and retry)."""
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
            return False
        except lmdb.Error as e:
            # The outer commit failed (a full disk shows up as ENOSPC or, after a short
            # write, EIO): nothing of the batch was written. Every request gets the error
            # and the writer keeps serving; the environment stays usable.
            log.error("LMDB write batch of %d failed: %s", len(batch), e)
            for req in batch:
                req.result = None
                req.error = type(e)(*e.args)
            return True
        if any(r.durable and r.error is None for r in batch):
            self._sync()
        return True

    def _sync(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error:
            # DESIGN.md §5: an fsync error is fail-stop; recovery after restart is the cure.
            log.critical("fsync of %s failed; stopping", self.path, exc_info=True)
            os._exit(70)
