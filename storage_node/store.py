"""The storage node's blob store: one LMDB environment in the layout of docs/design.md §3
(storage_node/layout.py spells it out).

Every write goes through `Database.write` (the single group-committing writer task), so the
store's write methods need `db.run_writer` running in the caller's nursery.

The store does I/O and verification only. Which states may be staged into, committed or
dropped is the participant's to decide (storage_node/participant.py); its actions name the
states they allow (`allowed`, defaulting to the participant's own sets), and the store checks,
inside the write transaction, that the blob is still in one of them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from dfs import runtime
from dfs.chunks import (
    CHUNK_SIZE,
    DIGEST_LEN,
    FileHasher,
    chunk_digest,
    chunk_length,
    chunk_problem,
    shape_problem,
)
from dfs.db import Database
from dfs.errors import Code, DfsError
from storage_node.layout import (
    MAX_BLOB_ID,
    MAX_INDEX,
    META_CLUSTER,
    META_NODE_ID,
    META_TOKEN,
    SUBDBS,
    U64,
    BlobInfo,
    BlobState,
    blob_key,
    check_blob_id,
    check_format,
    chunk_key,
    pack_info,
    parse_blob_key,
    parse_chunk_key,
    remove_compaction_leftover,
    unpack_info,
)
from storage_node.participant import COMMITTABLE, DROPPABLE, SERVABLE, STAGEABLE

log = logging.getLogger(__name__)

T = TypeVar("T")
# Slack below which an I/O error of a write counts as a full disk (LMDB reports a short write
# as EIO).
_FULL_SLACK = 16 * 1024 * 1024
# Blobs up to this size are verified on the trio thread at prepare.
INLINE_VERIFY_MAX = 256 * 1024


def default_map_size(path: Path) -> int:
    """Size of the whole filesystem (at least 1 GiB): the map then never has to grow.

    Growing the map (set_mapsize) is unsafe while another thread holds a read transaction,
    and a node's prepares hash blobs in read transactions on worker threads.
    """
    probe = path if path.exists() else path.parent
    try:
        st = os.statvfs(probe)
        total = st.f_blocks * st.f_frsize
    except OSError:
        total = 0
    return max(1 << 30, -(-total // (1 << 30)) * (1 << 30))


class BlobStore:
    """Blobs of one storage node: stage, prepare, commit, abort, read, list, delete."""

    def __init__(self, db: Database, *, capacity: int | None = None) -> None:
        self.db = db
        self.capacity_override = capacity
        self._reserved = 0  # bytes of stages between their capacity check and their commit
        # Blobs written while a compaction copies the file (storage_node/compaction.py); None
        # when none runs. Filled in the writer's transactions, on its worker thread.
        self.touched: set[int] | None = None
        self._node_id, self._cluster = self._read_identity()

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        capacity: int | None = None,
        readonly: bool = False,
        map_size: int | None = None,
    ) -> BlobStore:
        """Open (or, unless readonly, create) the store at path; DfsError(EINVAL) if unusable."""
        path = Path(path)
        if readonly and not (path / "data.mdb").is_file():
            raise DfsError(Code.EINVAL, f"{path}: no node store here (no data.mdb)")
        if not readonly:
            remove_compaction_leftover(path)
        try:
            db = Database(
                path, SUBDBS, map_size=map_size or default_map_size(path), readonly=readonly
            )
        except (lmdb.Error, OSError) as e:
            raise DfsError(Code.EINVAL, f"cannot open node store at {path}: {e}") from None
        try:
            check_format(db, readonly)
        except BaseException:
            db.close()
            raise
        return cls(db, capacity=capacity)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ identity (meta)

    def _read_identity(self) -> tuple[int, str]:
        def fn(txn: lmdb.Transaction) -> tuple[bytes | None, bytes | None]:
            return (
                txn.get(META_NODE_ID, db=self.db["meta"]),
                txn.get(META_CLUSTER, db=self.db["meta"]),
            )

        raw_id, raw_cluster = self.db.read(fn)
        node_id = U64.unpack(raw_id)[0] if raw_id else 0
        return node_id, raw_cluster.decode() if raw_cluster else ""

    @property
    def token(self) -> str:
        """This store's own random identity, made when it was created: a register whose reply
        was lost is sent again with it, and the coordinator answers with the same id."""
        raw = self.db.read(lambda txn: txn.get(META_TOKEN, db=self.db["meta"]))
        return bytes(raw).hex() if raw else ""

    @property
    def node_id(self) -> int:
        """The id the coordinator assigned at registration (0 before the first one)."""
        return self._node_id

    @property
    def cluster(self) -> str:
        """The cluster this node belongs to ("" before the first registration)."""
        return self._cluster

    async def set_identity(self, node_id: int, cluster: str) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            txn.put(META_NODE_ID, U64.pack(node_id), db=self.db["meta"])
            txn.put(META_CLUSTER, cluster.encode(), db=self.db["meta"])

        await self._write(fn, durable=True, blobs=())  # meta: compaction copies it whole
        self._node_id, self._cluster = node_id, cluster

    # ------------------------------------------------------------ space

    def used(self) -> int:
        """Bytes of LMDB pages holding blobs, chunks and meta (freed pages don't count)."""

        def fn(txn: lmdb.Transaction) -> int:
            total = 0
            for name in SUBDBS:
                st = txn.stat(self.db[name])
                pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                total += pages * st["psize"]
            return total

        return self.db.read(fn)

    def capacity(self) -> int:
        """The --capacity override, or what is used plus what the filesystem has free."""
        if self.capacity_override is not None:
            return self.capacity_override
        st = os.statvfs(self.db.path)
        return self.used() + st.f_bavail * st.f_frsize

    def count(self) -> int:
        return self.db.read(lambda txn: txn.stat(self.db["blobs"])["entries"])

    # ------------------------------------------------------------ writes

    async def stage(self, blob: int, index: int, data: bytes, *,
                    allowed: frozenset[str | None] = STAGEABLE) -> None:
        """Store one chunk unforced while the blob is in one of `allowed`. Re-staging identical
        bytes is a no-op; other bytes conflict (a staged chunk never changes)."""
        check_blob_id(blob)
        if not 0 <= index <= MAX_INDEX:
            raise DfsError(Code.EINVAL, f"chunk index {index} out of range")
        if len(data) > CHUNK_SIZE:
            raise DfsError(Code.EINVAL, f"chunk of {len(data)} bytes exceeds {CHUNK_SIZE}")
        need = len(data) + DIGEST_LEN
        if self.capacity_override is not None:
            if self.used() + self._reserved + need > self.capacity_override:
                raise DfsError(Code.ENOSPC, f"node full (capacity {self.capacity_override} bytes)")
        bkey, ckey = blob_key(blob), chunk_key(blob, index)

        def fn(txn: lmdb.Transaction) -> None:
            raw = txn.get(bkey, db=self.db["blobs"])
            state = None if raw is None else unpack_info(blob, raw).state.value
            if state not in allowed:
                raise DfsError(Code.CONFLICT, f"blob {blob} is {state}; staging refused")
            if raw is None:
                info = BlobInfo(blob, BlobState.STAGED, None, None, None, runtime.wall())
                txn.put(bkey, pack_info(info), db=self.db["blobs"])
            value = chunk_digest(data) + data
            old = txn.get(ckey, db=self.db["chunks"])
            if old is None:
                txn.put(ckey, value, db=self.db["chunks"])
            elif old != value:
                raise DfsError(
                    Code.CONFLICT, f"chunk {index} of blob {blob} staged with other bytes"
                )

        self._reserved += need
        try:
            await self._write(fn, durable=False, blobs=(blob,), need=need)
        finally:
            self._reserved -= need

    async def prepare(self, blob: int, size: int, checksum: bytes, nchunks: int) -> BlobInfo:
        """Verify every chunk and the whole-blob checksum, then force PREPARED (the YES vote).

        Raises ENOENT (missing chunks), CHECKSUM (bad bytes), EINVAL (chunks that don't fit
        size/nchunks) or CONFLICT (no longer STAGED: whether a prepared blob votes again is
        the participant's rule, storage_node/participant.py).
        """
        check_blob_id(blob)
        if problem := shape_problem(size, checksum, nchunks):
            raise DfsError(Code.EINVAL, problem)
        info = self.stat(blob)
        if info is not None and info.state != BlobState.STAGED:
            raise DfsError(Code.CONFLICT, f"blob {blob} is {info.state}, not staged")
        if size <= INLINE_VERIFY_MAX:  # microseconds of hashing: cheaper than a thread hop
            created = self._verify(blob, size, checksum, nchunks)
        else:  # reading and hashing a large blob is long work: off the trio thread
            created = await runtime.in_thread(self._verify, blob, size, checksum, nchunks)
        now = runtime.wall()

        def fn(txn: lmdb.Transaction) -> BlobInfo:
            raw = txn.get(blob_key(blob), db=self.db["blobs"])
            if raw is None:
                if nchunks:
                    raise DfsError(Code.CONFLICT, f"blob {blob} was dropped while preparing")
                start = now
            else:
                cur = unpack_info(blob, raw)
                if cur.state != BlobState.STAGED:
                    raise DfsError(Code.CONFLICT, f"blob {blob} is {cur.state}, not staged")
                # Chunks never change once staged and go only with their record; the same
                # record (same created stamp) therefore still holds the bytes just verified.
                if cur.created != created:
                    raise DfsError(Code.CONFLICT, f"blob {blob} was re-staged while preparing")
                start = cur.created
            new = BlobInfo(blob, BlobState.PREPARED, size, checksum, nchunks, start)
            txn.put(blob_key(blob), pack_info(new), db=self.db["blobs"])
            return new

        return await self._write(fn, durable=True, blobs=(blob,))

    async def stage_prepared(self, blob: int, index: int, data: bytes, size: int,
                             checksum: bytes, nchunks: int, *,
                             allowed: frozenset[str | None] = STAGEABLE) -> BlobInfo:
        """Store the blob's last chunk AND verify the whole blob and force PREPARED, in ONE
        durable write (a STAGE carrying the prepare fields, docs/design.md §5 rule 2): the
        chunks before it must be staged already, exactly as PREPARE requires. Errors as
        `stage` and `prepare` (a NO vote), CONFLICT for a blob no longer STAGED (as
        `prepare`)."""
        check_blob_id(blob)
        if problem := shape_problem(size, checksum, nchunks):
            raise DfsError(Code.EINVAL, problem)
        if index != nchunks - 1:  # also: an empty blob has no chunk to stage
            raise DfsError(Code.EINVAL, f"chunk {index} is not the last of {nchunks}")
        if len(data) != chunk_length(size, index):
            raise DfsError(Code.EINVAL, f"blob {blob}: chunk {index} has {len(data)} bytes, "
                                        f"want {chunk_length(size, index)}")
        info = self.stat(blob)
        if info is not None and info.state != BlobState.STAGED:
            raise DfsError(Code.CONFLICT, f"blob {blob} is {info.state}, not staged")
        need = len(data) + DIGEST_LEN
        if self.capacity_override is not None:
            if self.used() + self._reserved + need > self.capacity_override:
                raise DfsError(Code.ENOSPC, f"node full (capacity {self.capacity_override} bytes)")
        if size <= INLINE_VERIFY_MAX:
            created = self._verify(blob, size, checksum, nchunks, last=data)
        else:
            created = await runtime.in_thread(self._verify, blob, size, checksum, nchunks, data)
        bkey, ckey = blob_key(blob), chunk_key(blob, index)
        beyond = chunk_key(blob, nchunks) if nchunks <= MAX_INDEX else None
        value = chunk_digest(data) + data
        now = runtime.wall()

        def fn(txn: lmdb.Transaction) -> BlobInfo:
            raw = txn.get(bkey, db=self.db["blobs"])
            cur = None if raw is None else unpack_info(blob, raw)
            state = None if cur is None else cur.state.value
            if state not in allowed:
                raise DfsError(Code.CONFLICT, f"blob {blob} is {state}; staging refused")
            # The record verified is the one still here (chunks go only with their record).
            if (None if cur is None else cur.created) != created:
                raise DfsError(Code.CONFLICT, f"blob {blob} was re-staged while preparing")
            cursor = txn.cursor(db=self.db["chunks"])
            if beyond is not None and cursor.set_range(beyond) and cursor.key()[:8] == bkey:
                raise DfsError(Code.EINVAL, f"blob {blob}: a chunk beyond {nchunks}")
            old = txn.get(ckey, db=self.db["chunks"])
            if old is None:
                txn.put(ckey, value, db=self.db["chunks"])
            elif old != value:
                raise DfsError(
                    Code.CONFLICT, f"chunk {index} of blob {blob} staged with other bytes")
            new = BlobInfo(blob, BlobState.PREPARED, size, checksum, nchunks,
                           now if cur is None else cur.created)
            txn.put(bkey, pack_info(new), db=self.db["blobs"])
            return new

        self._reserved += need
        try:
            return await self._write(fn, durable=True, blobs=(blob,), need=need)
        finally:
            self._reserved -= need

    def _verify(self, blob: int, size: int, checksum: bytes, nchunks: int,
                last: bytes | None = None) -> float | None:
        """Check chunk digests, sizes and the xxh3_128 of the whole blob in one snapshot.
        `last`: the bytes of chunk nchunks-1, about to be stored with the PREPARED record
        (stage_prepared); the snapshot need not hold it yet (if it does, the write checks
        the two are the same)."""
        prefix = blob_key(blob)
        stored_upto = nchunks - 1 if last is not None else nchunks
        with self.db.snapshot(buffers=True) as txn:
            raw = txn.get(prefix, db=self.db["blobs"])
            created = unpack_info(blob, bytes(raw)).created if raw is not None else None
            hasher = FileHasher()
            expected = 0
            cursor = txn.cursor(db=self.db["chunks"])
            if cursor.set_range(prefix):
                for key, value in cursor.iternext():
                    if key[:8] != prefix:
                        break
                    index = parse_chunk_key(key)[1]
                    if last is not None and index >= stored_upto:
                        break  # the last chunk: `last` is hashed below
                    if index != expected:
                        raise DfsError(Code.ENOENT, f"blob {blob}: chunk {expected} missing")
                    if index >= nchunks:
                        raise DfsError(Code.EINVAL, f"blob {blob}: chunk {index} beyond {nchunks}")
                    data, want = value[DIGEST_LEN:], chunk_length(size, index)
                    if problem := chunk_problem(data, value[:DIGEST_LEN], want):
                        # A chunk of the wrong length was staged so (the writer's error);
                        # one failing its digest went bad here.
                        code = Code.EINVAL if len(data) != want else Code.CHECKSUM
                        raise DfsError(code, f"blob {blob}: chunk {index} {problem}")
                    hasher.update(data)
                    expected += 1
            if expected != stored_upto:
                raise DfsError(Code.ENOENT, f"blob {blob}: chunk {expected} missing")
            if last is not None:
                hasher.update(last)
            if hasher.size != size or hasher.digest() != checksum:
                raise DfsError(Code.CHECKSUM, f"blob {blob}: checksum mismatch")
        return created

    async def commit(self, blob: int, *,
                     allowed: frozenset[str | None] = COMMITTABLE) -> BlobInfo:
        """Force COMMITTED from a state in `allowed`; a COMMITTED blob is left as it is."""
        result = (await self.commit_many({blob: allowed}))[blob]
        if isinstance(result, DfsError):
            raise result
        return result

    async def commit_many(self, blobs: dict[int, frozenset[str | None]]
                          ) -> dict[int, BlobInfo | DfsError]:
        """Force COMMITTED for each blob (from a state in its `allowed`) in ONE durable write,
        so a batched COMMIT costs one fsync (docs/design.md §5 rule 5). A blob that is gone
        (ENOENT) or in a state its `allowed` does not hold (CONFLICT) gets its error and
        changes nothing; the others commit. A failed write (a full disk) raises for all."""
        for blob in blobs:
            check_blob_id(blob)

        def fn(txn: lmdb.Transaction) -> dict[int, BlobInfo | DfsError]:
            return {blob: self._commit_in(txn, blob, allowed) for blob, allowed in blobs.items()}

        return await self._write(fn, durable=True, blobs=tuple(blobs))

    def _commit_in(self, txn: lmdb.Transaction, blob: int,
                   allowed: frozenset[str | None]) -> BlobInfo | DfsError:
        raw = txn.get(blob_key(blob), db=self.db["blobs"])
        if raw is None:
            return DfsError(Code.ENOENT, f"blob {blob} not here")
        info = unpack_info(blob, raw)
        if info.state.value not in allowed:
            return DfsError(Code.CONFLICT, f"blob {blob} is {info.state}, not prepared")
        info = BlobInfo(
            blob, BlobState.COMMITTED, info.size, info.checksum, info.nchunks, info.created
        )
        txn.put(blob_key(blob), pack_info(info), db=self.db["blobs"])
        return info

    async def abort(self, blob: int, *,
                    allowed: frozenset[str | None] = DROPPABLE) -> bool:
        """Drop a blob that is in one of `allowed` (unforced: presumed abort)."""
        result = (await self.abort_many({blob: allowed}))[blob]
        if isinstance(result, DfsError):
            raise result
        return result

    async def abort_many(self, blobs: dict[int, frozenset[str | None]]
                         ) -> dict[int, bool | DfsError]:
        """Drop each blob that is in one of its `allowed` states, in one unforced write; one
        in another state gets CONFLICT and is kept. A failed write raises for all."""
        for blob in blobs:
            check_blob_id(blob)

        def fn(txn: lmdb.Transaction) -> dict[int, bool | DfsError]:
            out: dict[int, bool | DfsError] = {}
            for blob, allowed in blobs.items():
                raw = txn.get(blob_key(blob), db=self.db["blobs"])
                state = None if raw is None else unpack_info(blob, raw).state.value
                if state not in allowed:
                    out[blob] = DfsError(Code.CONFLICT, f"blob {blob} is {state}; abort refused")
                else:
                    out[blob] = self._drop(txn, blob)
            return out

        return await self._write(fn, durable=False, blobs=tuple(blobs))

    async def delete(self, blobs: list[int]) -> int:
        """Delete blobs in any state (GC of superseded versions); returns how many existed."""
        for blob in blobs:
            check_blob_id(blob)

        def fn(txn: lmdb.Transaction) -> int:
            return sum(self._drop(txn, blob) for blob in blobs)

        return await self._write(fn, durable=True, blobs=tuple(blobs))

    def _drop(self, txn: lmdb.Transaction, blob: int) -> bool:
        prefix = blob_key(blob)
        existed = txn.delete(prefix, db=self.db["blobs"])
        cursor = txn.cursor(db=self.db["chunks"])
        if cursor.set_range(prefix):
            while cursor.key()[:8] == prefix:
                existed = True
                if not cursor.delete():
                    break
        return existed

    async def _write(
        self, fn: Callable[[lmdb.Transaction], T], *, durable: bool, blobs: tuple[int, ...],
        need: int = 0,
    ) -> T:
        """Every write of the store: `blobs` names each blob fn may change, noted (inside the
        write transaction) while a compaction copies the file, which replays them after."""

        def noted(txn: lmdb.Transaction) -> T:
            touched = self.touched
            if touched is not None:
                touched.update(blobs)
            return fn(txn)

        try:
            return await self.db.write(noted, durable=durable)
        except (lmdb.Error, OSError) as e:
            if self._disk_full(e, need):
                raise DfsError(Code.ENOSPC, f"disk full: {e}") from None
            log.error("storage write failed: %s", e)
            raise DfsError(Code.INTERNAL, f"storage error: {e}") from None

    def _disk_full(self, e: BaseException, need: int) -> bool:
        """ENOSPC/EDQUOT, or an I/O error (LMDB's short write) while space is low. Any other
        error is not a full disk, however little space is left: it is INTERNAL, which the
        coordinator retries (an ENOSPC COMMIT marks the replica bad)."""
        if isinstance(e, lmdb.DiskError) or (
                isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        text = str(e)
        if "No space left" in text or "quota" in text.lower():
            return True
        short_write = (e.errno == errno.EIO if isinstance(e, OSError)
                       else os.strerror(errno.EIO) in text)
        if not short_write:
            return False
        try:
            st = os.statvfs(self.db.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < need + _FULL_SLACK

    # ------------------------------------------------------------ reads

    def stat(self, blob: int) -> BlobInfo | None:
        check_blob_id(blob)
        raw = self.db.read(lambda txn: txn.get(blob_key(blob), db=self.db["blobs"]))
        return unpack_info(blob, raw) if raw is not None else None

    def read_chunk(self, blob: int, index: int, *,
                   allowed: frozenset[str | None] = SERVABLE) -> tuple[bytes, bytes]:
        """(data, digest) of a chunk of a blob in a state of `allowed`, verified.

        ENOENT: no such blob (deleted by GC: the client turns it into ESTALE) or not servable;
        EINVAL: index out of range; CHECKSUM: the stored bytes don't match their digest.
        """
        check_blob_id(blob)
        if not 0 <= index <= MAX_INDEX:
            raise DfsError(Code.EINVAL, f"chunk index {index} out of range")
        with self.db.snapshot(buffers=True) as txn:
            raw = txn.get(blob_key(blob), db=self.db["blobs"])
            if raw is None:
                raise DfsError(Code.ENOENT, f"blob {blob} not here")
            info = unpack_info(blob, bytes(raw))
            if info.state.value not in allowed:
                raise DfsError(Code.ENOENT, f"blob {blob} is {info.state}, not readable")
            if index >= (info.nchunks or 0):
                raise DfsError(
                    Code.EINVAL, f"blob {blob} has {info.nchunks} chunks, not {index + 1}"
                )
            value = txn.get(chunk_key(blob, index), db=self.db["chunks"])
            if value is None or len(value) < DIGEST_LEN:
                raise DfsError(Code.CHECKSUM, f"blob {blob}: chunk {index} is missing")
            digest, data = bytes(value[:DIGEST_LEN]), bytes(value[DIGEST_LEN:])
        if problem := chunk_problem(data, digest, chunk_length(info.size or 0, index)):
            log.error("blob %d chunk %d %s", blob, index, problem)
            raise DfsError(Code.CHECKSUM, f"blob {blob}: chunk {index} is corrupt ({problem})")
        return data, digest

    def list(self, after: int = 0, limit: int = 1000) -> list[BlobInfo]:
        """Blobs with id > after, in id order, at most limit."""

        def fn(txn: lmdb.Transaction) -> list[BlobInfo]:
            out: list[BlobInfo] = []
            if limit <= 0 or after >= MAX_BLOB_ID:
                return out
            cursor = txn.cursor(db=self.db["blobs"])
            if not cursor.set_range(blob_key(after + 1)):
                return out
            for key, raw in cursor.iternext():
                out.append(unpack_info(parse_blob_key(key), raw))
                if len(out) >= limit:
                    break
            return out

        return self.db.read(fn)

    def pending(self) -> list[BlobInfo]:
        """Every STAGED or PREPARED blob (a full scan: at start-up, on a worker thread)."""

        def fn(txn: lmdb.Transaction) -> list[BlobInfo]:
            out = []
            for key, raw in txn.cursor(db=self.db["blobs"]).iternext():
                info = unpack_info(parse_blob_key(key), raw)
                if info.state != BlobState.COMMITTED:
                    out.append(info)
            return out

        return self.db.read(fn)
