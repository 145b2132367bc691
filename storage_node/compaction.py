"""Space that comes back: a node's LMDB file never shrinks, so the node compacts it online.

LMDB reuses freed pages but never gives them back to the file system; after a burst of writes
and deletes the file keeps its high-water mark (docs/storage-node.md, "Space"). A compaction
writes a compact copy of the environment beside it (`env.copy(compact=True)`, a consistent
snapshot of one read transaction, while the node keeps serving reads AND writes), then brings
the copy up to date and swaps it in:

1. `store.touched` starts collecting every blob a write changes (noted inside the writer's
   transaction); a barrier write makes sure no batch that began before is still uncommitted,
   so every write the copy's snapshot misses is noted.
2. Copy (long: proportional to the live data, not to the file).
3. Catch-up rounds, still serving: each takes the blobs noted so far (a barrier again) and
   replays them into the copy: the blob's record and chunks as they are now in the old file,
   or their absence. Until few are left (FINAL_DIRTY_MAX) or MAX_ROUNDS.
4. Writes paused (`Database.paused`: every earlier write is committed and flushed): the last
   noted blobs and the whole `meta` database are replayed, the copy is forced (fsync of its
   data and of its meta pages), renamed over data.mdb and the directory fsynced: that rename
   is the switch. The environment is reopened on the new file and writes resume.

Durability: an acknowledged PREPARE/COMMIT is forced in the old file, and is in the new one
before the rename (it was replayed, then fsynced). A crash before the rename leaves the old
file, complete; after it, the new one, complete. Writes are paused from the final replay
until the directory fsync, so nothing acknowledged is in one file only. A leftover copy
(COMPACT_DIR) is removed at open.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.failpoints import failpoint
from storage_node.layout import COMPACT_DIR, DIGEST_LEN, SUBDBS, blob_key
from storage_node.store import BlobStore

log = logging.getLogger(__name__)

MAX_ROUNDS = 5  # catch-up rounds while serving, before writes pause for the final one
FINAL_DIRTY_MAX = 256  # blobs left to replay at which writes pause for the final round
SPACE_MARGIN = 64 * 1024 * 1024  # free space a copy must leave on the file system


def on_disk_bytes(path: Path) -> int:
    """Bytes the store's files take: data.mdb, lock.mdb and a compaction's copy, if any."""
    total = 0
    for d in (Path(path), Path(path) / COMPACT_DIR):
        for name in ("data.mdb", "lock.mdb"):
            try:
                total += (d / name).stat().st_size
            except OSError:
                pass
    return total


def live_bytes(store: BlobStore) -> int:
    """Bytes of blob data stored (every chunk, staged ones too; digests not counted). A walk of the chunk keys:
    each value's length is in its leaf page, the data pages are not read. Blocking."""
    with store.db.snapshot(buffers=True) as txn:
        total = 0
        for value in txn.cursor(db=store.db["chunks"]).iternext(keys=False, values=True):
            total += len(value) - DIGEST_LEN
        return total


@dataclass
class Compaction:
    """One compaction's progress and, once done, its figures (node_info, `dfs compact`)."""

    id: int
    phase: str = "starting"  # copying, catching up, swapping, done, failed
    started: float = field(default_factory=time.monotonic)
    before: int = 0  # on-disk bytes before
    after: int | None = None
    live: int | None = None
    copy_s: float | None = None
    pause_s: float | None = None  # how long writes waited
    rounds: int = 0
    replayed: int = 0  # blobs replayed into the copy
    error: str = ""
    elapsed_s: float | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def running(self) -> bool:
        return self.phase not in ("done", "failed")

    def to_wire(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        if elapsed is None:
            elapsed = time.monotonic() - self.started
        return {"id": self.id, "phase": self.phase, "running": self.running,
                "before": self.before, "after": self.after, "live": self.live,
                "copy_s": self.copy_s, "pause_s": self.pause_s, "rounds": self.rounds,
                "replayed": self.replayed, "error": self.error, "elapsed_s": round(elapsed, 3)}


class Compactor:
    """Measures the store's space and compacts it: on demand (`start`) or when dead space
    passes the thresholds (`check`, from the node's space loop)."""

    def __init__(self, store: BlobStore, *, ratio: float = 2.0,
                 min_dead: int = 64 * 1024 * 1024) -> None:
        self.store = store
        self.ratio = ratio  # 0: never automatic
        self.min_dead = min_dead
        self.live: int | None = None
        self.on_disk: int | None = None
        self.current: Compaction | None = None
        self.nursery: trio.Nursery | None = None  # where compactions run (the node's)
        self._count = 0

    @property
    def supported(self) -> bool:
        return self.store.db.is_lmdb

    async def measure(self) -> None:
        self.live = await runtime.in_thread(live_bytes, self.store)
        self.on_disk = on_disk_bytes(self.store.db.path)

    def space(self) -> dict[str, int | None]:
        return {"live": self.live, "on_disk": self.on_disk}

    def worth_it(self) -> bool:
        """Automatic trigger: the file is over `ratio` times the pages in use, and the excess
        over `min_dead`. Pages in use (`used`) are what a compact copy keeps, so a compaction
        this starts always gives space back (live bytes alone would miss page overhead)."""
        if not self.ratio or not self.supported or self.on_disk is None:
            return False
        used = self.store.used()
        return self.on_disk > self.ratio * used and self.on_disk - used > self.min_dead

    def start(self) -> Compaction:
        """The running compaction, or a new one started in the node's nursery."""
        if not self.supported or self.nursery is None:
            raise DfsError(Code.EINVAL, "this store cannot be compacted (not an LMDB file)")
        if self.current is not None and self.current.running:
            return self.current
        self._count += 1
        job = self.current = Compaction(self._count, before=on_disk_bytes(self.store.db.path))
        self.nursery.start_soon(self.run, job)
        return job

    async def run(self, job: Compaction) -> None:
        """Carry out one compaction; a failure leaves the old file in use (and is logged)."""
        store, db = self.store, self.store.db
        tmp = db.path / COMPACT_DIR
        copy: Any = None
        try:
            self._check_room()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            store.touched = set()
            await _barrier(store)
            job.phase = "copying"
            t0 = time.monotonic()
            await runtime.in_thread(lambda: db.env.copy(str(tmp), compact=True))
            # Forced now, while serving: the paused round then flushes only its own pages.
            await runtime.in_thread(_fsync_file, tmp / "data.mdb")
            job.copy_s = round(time.monotonic() - t0, 3)
            await failpoint("node.compact_after_copy")
            copy = await runtime.in_thread(_open_copy, tmp, db.open_options)
            job.phase = "catching up"
            # At least one round while serving: what the copy missed is mostly written then,
            # and the paused round has only the last few blobs left.
            while job.rounds < MAX_ROUNDS and store.touched and (
                    job.rounds == 0 or len(store.touched) > FINAL_DIRTY_MAX):
                dirty, store.touched = store.touched, set()
                await _barrier(store)  # no write that noted into `dirty` is uncommitted
                job.rounds += 1
                job.replayed += len(dirty)
                await runtime.in_thread(_replay, store, copy, sorted(dirty), False)
            job.phase = "swapping"
            async with db.paused():
                p0 = time.monotonic()
                dirty, store.touched = store.touched, None
                job.replayed += len(dirty)
                await runtime.in_thread(_replay, store, copy, sorted(dirty), True)
                copy.close()  # forced by _replay (env.sync(True): its data and meta pages)
                copy = None
                await failpoint("node.compact_before_swap")
                # Held open past the switch: the old file's blocks are freed when it is
                # closed, which takes long for a big file; that close waits for the writes.
                old = os.open(db.path / "data.mdb", os.O_RDONLY)
                try:
                    swapped = await db.reopen(lambda: _switch(tmp / "data.mdb", db.path))
                    job.pause_s = round(time.monotonic() - p0, 4)
                    if swapped:
                        await failpoint("node.compact_after_swap")
                except BaseException:
                    os.close(old)
                    raise
            await runtime.in_thread(os.close, old)
            if not swapped:
                raise DfsError(Code.UNAVAILABLE, "long reads kept the old file open; try again")
            job.phase = "done"  # the new file is in use, whatever follows
            shutil.rmtree(tmp, ignore_errors=True)
            await self.measure()
            job.after, job.live = self.on_disk, self.live
            log.info("compacted: %d -> %d bytes on disk (live %d) in %.2f s, writes paused "
                     "%.4f s, %d blobs replayed", job.before, job.after, job.live,
                     time.monotonic() - job.started, job.pause_s, job.replayed)
        except (DfsError, lmdb.Error, OSError) as e:
            if job.phase == "done":  # switched: only the clean-up or the measure failed
                log.warning("after compaction: %s", e)
            else:
                job.phase, job.error = "failed", str(e)
                log.error("compaction failed (the old file stays in use): %s", e)
        except Exception as e:  # a bug here must not take the node down with it
            if job.phase != "done":
                job.phase, job.error = "failed", f"internal error: {e!r}"
            log.exception("compaction failed")
        finally:
            store.touched = None
            if copy is not None:
                copy.close()
            if job.running:  # cancelled
                job.phase, job.error = "failed", job.error or "cancelled"
            if job.phase == "failed":
                shutil.rmtree(tmp, ignore_errors=True)
            job.elapsed_s = round(time.monotonic() - job.started, 3)
            job.finished.set()

    def _check_room(self) -> None:
        st = os.statvfs(self.store.db.path)
        free, need = st.f_bavail * st.f_frsize, self.store.used() + SPACE_MARGIN
        if free < need:
            raise DfsError(Code.ENOSPC, f"a compact copy needs {need} bytes free, have {free}")


async def _barrier(store: BlobStore) -> None:
    """Returns once every write batch begun before it is committed."""
    await store.db.write(lambda txn: None, durable=False)


def _open_copy(path: Path, options: dict[str, Any]) -> Any:
    env = lmdb.open(str(path), **{**options, "lock": True, "readonly": False})
    return env


def _replay(store: BlobStore, copy: Any, blobs: list[int], meta: bool) -> None:
    """Make each blob in the copy what it is now in the store (record and chunks, or none);
    with `meta` (the final round), the meta database too. One write transaction, forced."""
    db = store.db
    dbs = {name: copy.open_db(name.encode()) for name in SUBDBS}
    with db.snapshot(buffers=False) as src, copy.begin(write=True) as dst:
        for blob in blobs:
            prefix = blob_key(blob)
            dst.delete(prefix, db=dbs["blobs"])
            cur = dst.cursor(db=dbs["chunks"])
            if cur.set_range(prefix):
                while cur.key()[:8] == prefix:
                    if not cur.delete():
                        break
            raw = src.get(prefix, db=db["blobs"])
            if raw is None:
                continue
            dst.put(prefix, raw, db=dbs["blobs"])
            scur = src.cursor(db=db["chunks"])
            if scur.set_range(prefix):
                for key, value in scur.iternext():
                    if key[:8] != prefix:
                        break
                    dst.put(key, value, db=dbs["chunks"])
        if meta:
            dst.drop(dbs["meta"], delete=False)
            for key, value in src.cursor(db=db["meta"]).iternext():
                dst.put(key, value, db=dbs["meta"])
    copy.sync(True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _switch(new: Path, directory: Path) -> None:
    """The switch: the forced copy replaces data.mdb, and the rename is made durable."""
    os.rename(new, directory / "data.mdb")
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
