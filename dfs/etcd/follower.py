"""A standby's warm cache: the metadata loaded from etcd while it waits, kept in step by a watch.

Why: a leader runs over a local LMDB copy of etcd (dfs/etcd/mirror.py). Loading that copy at
takeover took time in proportion to the namespace (18 s at 10^5 files, against the 5 s a
failover may take: docs/coordinator.md). A standby therefore loads it as soon as it starts
and applies every change the leader writes as etcd reports it (dfs/etcd/watch.py). Elected,
it needs only the changes up to its own election before it can lead.

Which changes those are: every write of the old leader is one etcd txn that compares the old
election key's create revision (fencing), so every one that ever lands is older than the new
election key. The watch covers the whole root, the election key included; once the cache has
applied the event that created this standby's own key, nothing the old leader wrote is still
on its way, and the cache equals what a fresh load would read.

`revision` is the newest revision whose events the cache holds. A watch broken off is begun
again at that revision, not the next: a revision whose events were split over two replies is
then applied whole (puts and deletes applied twice leave what applying them once left).

Error policy (`run`): etcd failures are logged and retried after a pause; a compaction past
`revision` loads the cache again; anything else is a bug and ends the process. `stop` ends
it between two batches, never inside an LMDB write.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import trio

from dfs import runtime
from dfs.db import Database
from dfs.etcd.client import Compacted, EtcdClient, EtcdError, prefix_end
from dfs.etcd.election import LostLeadership
from dfs.etcd.mirror import EtcdMirror, load
from dfs.etcd.watch import Event, Idle, watch

log = logging.getLogger(__name__)

RETRY_PAUSE = 0.5  # after an etcd failure, before the next load or watch


class Follower:
    """The cache directory `path` as a copy of etcd's metadata under `root`/meta."""

    def __init__(self, client: EtcdClient, root: str, meta_prefix: str, path: Path | str,
                 subdbs: list[str], *, map_size: int = 1 << 30) -> None:
        self.client = client
        self.path = Path(path)
        self.subdbs = list(subdbs)
        self.map_size = map_size
        self.revision = 0  # every event up to it is in the cache (0: not loaded)
        self.applied = 0  # events applied since the load (tests, logs)
        # Set while this process leads and the load is still running: renews the lease
        # between pages (EtcdMirror.renew_if_due), as a leader's own load does.
        self.renew: Callable[[], None] | None = None
        self._watched = root.rstrip("/").encode() + b"/"
        self._meta = meta_prefix.rstrip("/").encode() + b"/"
        self._db: Database | None = None
        self._progress = trio.Event()
        self._turn = 0  # rotates the member a watch asks first
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    # ------------------------------------------------------------ the task

    async def run(self) -> None:
        try:
            with self._scope:
                while True:
                    try:
                        if self._db is None:
                            await self._load()
                        await watch(self._endpoints(), self._watched,
                                    prefix_end(self._watched), self.revision, self._apply,
                                    tls=self.client.tls)
                    except Idle:
                        # Nothing changed for a while, or the member took the request and
                        # went silent (paused, partitioned): watch again from here, through
                        # the next member first.
                        self._turn += 1
                        continue
                    except Compacted:
                        log.warning("etcd compacted past the standby's cache (revision %d): "
                                    "loading it again", self.revision)
                        self._drop()
                    except EtcdError as e:
                        log.info("standby cache: %s; trying again", e.msg)
                        self._turn += 1
                        await trio.sleep(RETRY_PAUSE)
        finally:
            self._stopped.set()

    def _endpoints(self) -> list[str]:
        """The members, from a different one after each silent or broken watch."""
        members = self.client.endpoints
        first = self._turn % len(members)
        return members[first:] + members[:first]

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    @property
    def loaded(self) -> bool:
        return self._db is not None

    async def caught_up(self, revision: int, stall: float) -> bool:
        """Wait until the cache holds every change up to `revision`; False when the loaded
        cache applies nothing for `stall` seconds on the way (the caller loads afresh). A
        cache that is behind but applying (after a burst of writes) is waited for: catching
        up is faster than a load."""
        while not self.loaded:
            await self._progress.wait()
        while self.revision < revision:
            with trio.move_on_after(stall):
                await self._progress.wait()
                continue
            log.warning("the standby's cache is stuck at revision %d, short of %d, for %.1f s",
                        self.revision, revision, stall)
            return False
        return True

    def close(self) -> None:
        """After `stop`: the cache directory, closed, for MetaStore.open(..., loaded=True)."""
        self._drop()

    # ------------------------------------------------------------ internals

    async def _load(self) -> None:
        started = time.monotonic()
        self.revision = await runtime.in_thread(self._load_now)
        self._advanced()
        log.info("standby cache loaded at etcd revision %d in %.2f s; following",
                 self.revision, time.monotonic() - started)

    def _load_now(self) -> int:
        EtcdMirror.prepare(self.path)
        db = Database(self.path, self.subdbs, map_size=self.map_size, cache=True)
        try:
            revision = load(self.client, self._meta.decode().rstrip("/"), db,
                            renew=self._renew)
        except BaseException:
            db.close()
            raise
        self._db = db
        return revision

    def _renew(self) -> None:
        renew = self.renew
        if renew is None:
            return
        # A lost lease is marked on the leadership; the leader's keepalive steps it down.
        with contextlib.suppress(LostLeadership):
            renew()

    async def _apply(self, events: list[Event]) -> None:
        changes = []
        for event in events:
            where = self._where(event.key)
            if where is not None:
                changes.append((*where, event.value))
        if changes:
            await runtime.in_thread(self._write, changes)
        self.applied += len(changes)
        self.revision = max(self.revision, events[-1].revision)
        self._advanced()

    def _advanced(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _where(self, key: bytes) -> tuple[str, bytes] | None:
        """(sub-db, raw LMDB key) of a metadata key; None for anything else (the election
        key, the mirror's chain marker, a migration's flag)."""
        if not key.startswith(self._meta):
            return None
        name, slash, raw = key[len(self._meta):].partition(b"/")
        text = name.decode(errors="replace")
        if not slash or self._db is None or text not in self._db.dbs:
            return None
        return text, raw

    def _write(self, changes: list[tuple[str, bytes, bytes | None]]) -> None:
        db = self._db
        assert db is not None, "events are applied only to a loaded cache"
        while True:
            try:
                with db.env.begin(write=True) as txn:
                    for name, key, value in changes:
                        handle = db.dbs[name]
                        if value is None:
                            txn.delete(key, db=handle)
                        else:
                            txn.put(key, value, db=handle)
                return
            except lmdb.MapFullError:  # nothing was written (the transaction aborted): grow
                db.env.set_mapsize(db.env.info()["map_size"] * 2)

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self.revision = 0
