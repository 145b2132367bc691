"""Replica maintenance on a node: deep verification, copying a blob from another node, scrub.

- `verify` re-reads and re-hashes many blobs in one request, in a worker thread, so a checker
  verifies a whole node with a few round trips and the event loop keeps serving.
- `fetch` makes this node hold a good copy of a committed blob by pulling its chunks from
  other replicas (node to node: the coordinator and the checker never carry the bytes). It is
  the STAGE step of a repair transaction; the coordinator then PREPAREs and COMMITs it like any
  write. A local copy that verifies is kept ("have"); a bad one is dropped first, which leaves
  the node no worse (a missing replica instead of a rotten one; docs/checker.md).
- The scrubber walks every committed blob at a bounded rate and reports corrupt ones to the
  coordinator, which repairs them without waiting for a reader or a checker to stumble on them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dfs import runtime
from dfs.chunks import FileHasher, chunk_length, chunk_problem
from dfs.errors import Code, DfsError
from dfs.locks import KeyedLocks
from dfs.rpc import Peers, Request
from storage_node.layout import (
    DIGEST_LEN,
    BlobState,
    blob_key,
    parse_chunk_key,
    unpack_info,
)
from storage_node.participant import Refuse

if TYPE_CHECKING:
    from storage_node.participant import Participant
    from storage_node.store import BlobStore

log = logging.getLogger(__name__)

FETCH_WINDOW = 4  # chunks pulled at once
# A fetch given `within_ms` (the coordinator's own deadline for it) ends by then, and a source
# gets a share of it per chunk read before the next is tried: a crashed or paused source (no
# reply, no reset) must not hold the blob's lock, and so every retry of the repair, for the
# peers' 30 s timeout. Never less than this per read.
MIN_SOURCE_WAIT = 0.5
VERIFY_BATCH_BYTES = 4 * 1024 * 1024  # scrub: bytes hashed per worker-thread hop


@dataclass
class Verdict:
    """What re-reading one blob found. `state` None: the blob is not on this node."""

    blob: int
    state: str | None
    ok: bool
    size: int | None = None
    checksum: bytes | None = None
    bad_chunks: list[int] = field(default_factory=list)
    error: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "ok": self.ok, "size": self.size, "checksum": self.checksum,
                "bad_chunks": self.bad_chunks, "error": self.error}


def verify_blob(store: BlobStore, blob: int) -> Verdict:
    """Re-hash every chunk of a prepared/committed blob against its digest and the whole blob
    against its recorded xxh3_128; names every bad chunk, not just the first. Blocking."""
    with store.db.snapshot(buffers=True) as txn:
        raw = txn.get(blob_key(blob), db=store.db["blobs"])
        if raw is None:
            return Verdict(blob, None, False, error="not on this node")
        info = unpack_info(blob, bytes(raw))
        if info.state == BlobState.STAGED:
            return Verdict(blob, info.state.value, False, error="only staged")
        size, nchunks = info.size or 0, info.nchunks or 0
        verdict = Verdict(blob, info.state.value, True, info.size, info.checksum)
        hasher = FileHasher()
        expected = 0
        prefix = blob_key(blob)
        cursor = txn.cursor(db=store.db["chunks"])
        found = cursor.set_range(prefix)
        while found and bytes(cursor.key()[:8]) == prefix:
            index = parse_chunk_key(bytes(cursor.key()))[1]
            if index >= nchunks:
                verdict.bad_chunks.append(index)
                break
            verdict.bad_chunks.extend(range(expected, index))  # missing chunks
            value = cursor.value()
            data = value[DIGEST_LEN:]
            if chunk_problem(data, bytes(value[:DIGEST_LEN]), chunk_length(size, index)):
                verdict.bad_chunks.append(index)
            hasher.update(data)
            expected = index + 1
            found = cursor.next()
        verdict.bad_chunks.extend(range(expected, nchunks))
    if verdict.bad_chunks:
        verdict.ok = False
        verdict.error = f"chunks {verdict.bad_chunks} corrupt or missing"
    elif hasher.size != size or hasher.digest() != info.checksum:
        verdict.ok = False
        verdict.error = "checksum mismatch (every chunk matches its digest)"
    return verdict


def verify_many(store: BlobStore, blobs: list[int]) -> list[Verdict]:
    return [verify_blob(store, blob) for blob in blobs]


class MaintenanceOps:
    """Mixed into NodeService: ops `verify` and `fetch` (docs/protocol.md)."""

    store: BlobStore
    participant: Participant
    peers: Peers | None = None  # set by Node: connections to other nodes, for fetch
    clock: Callable[[], float]
    _txn_locks: KeyedLocks
    _stored: Any

    async def op_verify(self, req: Request) -> dict[str, Any]:
        from storage_node.server import _blob_ids

        blobs = _blob_ids(req, "blobs")
        verdicts = await runtime.in_thread(verify_many, self.store, blobs)
        return {"results": {v.blob: v.to_wire() for v in verdicts}}

    async def op_fetch(self, req: Request) -> dict[str, Any]:
        """Hold a good copy of blob: keep a local one that verifies, else pull it (STAGED)."""
        from storage_node.server import _blob_id

        blob, size = _blob_id(req, "blob"), req.int("size")
        checksum, nchunks = req.bytes("checksum"), req.int("nchunks")
        sources = req.list("sources")
        if not all(isinstance(s, str) for s in sources):
            raise DfsError(Code.BAD_REQUEST, "fetch: sources must be addresses")
        within_ms = req.int("within_ms", required=False)
        if not within_ms:  # from a coordinator that sets no deadline: the peers' own
            return await self._fetch(blob, size, checksum, nchunks, sources, None)
        with trio.move_on_after(within_ms / 1000):
            return await self._fetch(blob, size, checksum, nchunks, sources, within_ms / 1000)
        raise DfsError(Code.UNAVAILABLE, f"fetch of blob {blob}: not done in {within_ms} ms")

    async def _fetch(self, blob: int, size: int, checksum: bytes, nchunks: int,
                     sources: list[str], budget: float | None) -> dict[str, Any]:
        async with self._txn_locks.hold(blob):
            info = self.store.stat(blob)
            if info is not None and info.state != BlobState.STAGED:
                verdict = await runtime.in_thread(verify_blob, self.store, blob)
                if verdict.ok and (info.size, info.checksum) == (size, checksum):
                    return {"have": True, "state": info.state.value}
                log.warning("blob %d: local copy is bad (%s); fetching it again", blob,
                            verdict.error or "other content")
            if info is not None:
                await self.store.delete([blob])
            self.participant.forget(blob)
            wait = max(MIN_SOURCE_WAIT, budget / len(sources)) if budget and sources else None
            await self._pull(blob, size, nchunks, sources, wait)
        return {"have": False}

    async def _pull(self, blob: int, size: int, nchunks: int, sources: list[str],
                    wait: float | None) -> None:
        if nchunks and not sources:
            raise DfsError(Code.UNAVAILABLE, f"fetch of blob {blob}: no source")
        if self.peers is None:
            raise DfsError(Code.UNAVAILABLE, "this node cannot reach other nodes")
        bad: set[str] = set()
        failures: list[str] = []
        indexes = iter(range(nchunks))

        async def worker() -> None:
            for index in indexes:
                data = await self._chunk_from(blob, index, size, sources, bad, failures, wait)
                action = self.participant.on_stage(blob, self._stored(blob), self.clock())
                if isinstance(action, Refuse):
                    raise action.error()
                await self.store.stage(blob, index, data)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(FETCH_WINDOW, max(nchunks, 1))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            # The workers' errors are the fetch's answer (UNAVAILABLE, CHECKSUM): the first
            # one, not a group the server would have to answer INTERNAL.
            errors, rest = group.split(DfsError)
            if errors is None or rest is not None:
                raise
            raise _first(errors) from None

    async def _chunk_from(self, blob: int, index: int, size: int, sources: list[str],
                          bad: set[str], failures: list[str], wait: float | None) -> bytes:
        assert self.peers is not None
        want = chunk_length(size, index)
        for address in sources:
            try:
                reply = await self.peers[address].call("read", timeout=wait, blob=blob,
                                                       index=index)
            except DfsError as e:
                if e.code is Code.CHECKSUM:
                    bad.add(address)
                failures.append(f"{address}: {e.msg}")
                continue
            data = reply.get("data")
            if problem := chunk_problem(data, reply.get("digest"), want):
                bad.add(address)
                failures.append(f"{address}: chunk {index} {problem}")
                continue
            assert isinstance(data, bytes)
            return data
        code = Code.CHECKSUM if bad and bad >= set(sources) else Code.UNAVAILABLE
        raise DfsError(code, f"fetch of blob {blob} chunk {index}: " + "; ".join(failures[-3:]),
                       bad_sources=sorted(bad))


def _first(group: BaseExceptionGroup[DfsError]) -> DfsError:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, DfsError)
    return error


Reporter = Callable[[list[int], str], Awaitable[None]]


class Scrubber:
    """Verifies every committed blob at most `rate` bytes/s, one pass per `interval` seconds,
    and reports the corrupt ones (retrying the report until the coordinator has it)."""

    def __init__(self, store: BlobStore, rate: float, interval: float,
                 report: Reporter | None) -> None:
        self.store = store
        self.rate = rate
        self.interval = interval
        self.report = report
        self.unreported: set[int] = set()
        self.passes = 0
        self.scrubbed_bytes = 0
        self.corrupt_found = 0

    async def run(self) -> None:
        if self.rate <= 0:
            return
        await trio.sleep(min(self.interval, 60.0))
        while True:
            await self.one_pass()
            self.passes += 1
            await trio.sleep(self.interval)

    async def one_pass(self) -> None:
        after = 0
        while True:
            page = self.store.list(after, 256)
            if not page:
                break
            after = page[-1].blob
            batch: list[int] = []
            size = 0
            for info in page:
                if info.state == BlobState.STAGED:
                    continue
                batch.append(info.blob)
                size += info.size or 0
                if size >= VERIFY_BATCH_BYTES:
                    await self._verify(batch, size)
                    batch, size = [], 0
            if batch:
                await self._verify(batch, size)
        await self._flush()

    async def _verify(self, blobs: list[int], size: int) -> None:
        verdicts = await runtime.in_thread(verify_many, self.store, blobs)
        for v in verdicts:
            if v.state is not None and v.state != BlobState.STAGED and not v.ok:
                log.error("scrub: blob %d is corrupt: %s", v.blob, v.error)
                self.unreported.add(v.blob)
                self.corrupt_found += 1
        self.scrubbed_bytes += size
        if self.unreported:
            await self._flush()
        await trio.sleep(size / self.rate)

    async def _flush(self) -> None:
        if not self.unreported or self.report is None:
            return
        blobs = sorted(self.unreported)
        try:
            await self.report(blobs, "scrub: stored bytes fail their checksum")
        except DfsError as e:
            log.warning("scrub: could not report %d corrupt blobs yet: %s", len(blobs), e)
            return
        self.unreported.difference_update(blobs)
