"""The write transaction, client side (docs/design.md §5): begin, stage to every replica, commit.

A file that fits in one chunk takes a short path: its one STAGE carries the prepare fields,
each replica votes in its reply, and the commit names the voters (`voted`), so the coordinator
sends no PREPARE (rule 2). Larger files stream, and memory stays bounded whatever the file
size: one task reads the source a chunk at a time in a
worker thread (hashing it there too), and `window` stager tasks each carry one chunk to all R
replicas at once, so at most about window + 1 chunks are in memory.

A replica that fails while staging, or a commit refused because a replica voted NO or timed out,
aborts this txid and starts over with a fresh placement that excludes the failed nodes. If the
commit's reply is lost (the coordinator connection broke), the outcome is asked for instead of
guessed: a retry of a write that did commit would, under if_version, conflict with itself. The
question goes to whichever coordinator leads by then (the client's link follows a failover), and
an "aborted" there starts the write over.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import trio

from dfs import runtime
from dfs.chunks import CHUNK_SIZE, FileHasher, nchunks
from dfs.client.attr import Attr
from dfs.client.tasks import task_group
from dfs.errors import Code, DfsError
from dfs.rpc import NotSent, PeerUnavailable

if TYPE_CHECKING:
    from dfs.client.client import Client

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF = 0.1
MAX_BACKOFF = 2.0
OUTCOME_POLL = 0.2


REPLICA_FAULTS = frozenset({Code.UNAVAILABLE, Code.ENOSPC, Code.INTERNAL})


class TransactionLost(DfsError):
    """The coordinator no longer knows the transaction (it expired it, or restarted)."""


class CommittedUnread(DfsError):
    """The write committed (OUTCOME said so after its reply was lost), but what it made could
    not be read back within commit_timeout. Never retried and never reported as failed: the
    write landed; only its new attributes are unknown to the caller."""


class ReplicaFailed(Exception):
    """A replica failed while staging: abort, and place the retry elsewhere."""

    def __init__(self, node_id: int, error: DfsError) -> None:
        super().__init__(f"node {node_id}: {error.msg}")
        self.node_id = node_id
        self.error = error


@dataclass
class Staged:
    size: int
    checksum: bytes
    nchunks: int
    voted: tuple[int, ...] = ()  # replicas that voted YES in their STAGE (the one-chunk path)


def _read_chunk(source: BinaryIO, hasher: FileHasher) -> bytes:
    """Read one whole chunk (or what is left), hashing it; runs in a worker thread."""
    parts: list[bytes] = []
    want = CHUNK_SIZE
    while want:
        data = source.read(want)
        if not data:
            break
        parts.append(data)
        want -= len(data)
    chunk = parts[0] if len(parts) == 1 else b"".join(parts)
    hasher.update(chunk)
    return chunk


def _start(source: BinaryIO, hasher: FileHasher) -> tuple[int, bytes]:
    """The source's size and first chunk, in one thread hop (small files need no more)."""
    size = source.seek(0, io.SEEK_END)
    source.seek(0)
    return size, _read_chunk(source, hasher) if size else b""


async def stage(
    client: Client,
    txid: int,
    replicas: list[tuple[int, str]],
    source: BinaryIO,
    progress: Callable[[int], Any] | None,
) -> Staged:
    """Send every chunk of source to every replica; the size, checksum and count staged.

    The source is read up to the size it had when staging began (or its end, if it shrank).
    """
    hasher = FileHasher()
    size, first = await runtime.in_thread(_start, source, hasher)
    if size <= CHUNK_SIZE:
        return await _stage_one(client, txid, replicas, first, hasher, progress)
    count = 0
    done = 0
    send, receive = trio.open_memory_channel[tuple[int, bytes]](0)

    async def reader() -> None:
        nonlocal count
        async with send:
            for index in range(nchunks(size)):
                if index == 0:
                    chunk = first
                else:
                    chunk = await runtime.in_thread(_read_chunk, source, hasher)
                if not chunk:
                    return
                await send.send((index, chunk))
                count += 1
                if len(chunk) < CHUNK_SIZE:
                    return

    async def to_replica(node_id: int, address: str, index: int, chunk: bytes) -> None:
        await _stage_to(client, node_id, address, dict(txid=txid, index=index, data=chunk))

    async def stager(chunks: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
        nonlocal done
        async with chunks:
            async for index, chunk in chunks:
                async with task_group() as fanout:
                    for node_id, address in replicas:
                        fanout.start_soon(to_replica, node_id, address, index, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done)

    async def pipeline(finished: trio.Event) -> None:
        async with task_group() as group:
            group.start_soon(reader)
            async with receive:
                for _ in range(max(1, min(client.window, nchunks(size)))):
                    group.start_soon(stager, receive.clone())
        finished.set()

    finished = trio.Event()
    async with task_group() as outer:
        outer.start_soon(pipeline, finished)
        outer.start_soon(_keepalive, client, txid, finished)
    return Staged(hasher.size, hasher.digest(), count)


async def _stage_to(client: Client, node_id: int, address: str, fields: dict[str, Any]) -> None:
    try:
        await client.peers[address].call("stage", **fields)
    except DfsError as e:
        # Errors about this replica (down, full, failing) are worth a placement without it;
        # only a transaction the coordinator already aborted (CONFLICT) is not.
        if e.code in REPLICA_FAULTS:
            raise ReplicaFailed(node_id, e) from None
        raise


async def _stage_one(
    client: Client,
    txid: int,
    replicas: list[tuple[int, str]],
    chunk: bytes,
    hasher: FileHasher,
    progress: Callable[[int], Any] | None,
) -> Staged:
    """A file of one chunk (or none), read and hashed in the one thread hop already made: its
    STAGE carries the prepare fields, so each replica stores it and votes in one forced write
    (docs/design.md §5, rule 2), and the commit names them in `voted` (no PREPARE round).
    No reader, stager or keepalive task: it is one round to all replicas at once. An empty
    file stages nothing; the coordinator prepares it as usual."""
    staged = Staged(hasher.size, hasher.digest(), nchunks(hasher.size))
    if not chunk:
        return staged
    fields = dict(txid=txid, index=0, data=chunk, size=staged.size,
                  checksum=staged.checksum, nchunks=staged.nchunks)
    async with task_group() as fanout:
        for node_id, address in replicas:
            fanout.start_soon(_stage_to, client, node_id, address, fields)
    if progress is not None:
        progress(staged.size)
    staged.voted = tuple(node_id for node_id, _ in replicas)
    return staged


async def _keepalive(client: Client, txid: int, finished: trio.Event) -> None:
    while True:
        # While chunks stream to the nodes the coordinator hears nothing from us; a `touch`
        # every quarter of its --txn-timeout (the begin reply says how often) keeps it open.
        with trio.move_on_after(client.keepalive):
            await finished.wait()
            return
        try:
            await client.coordinator.call("touch", txid=txid)
        except PeerUnavailable:
            continue  # the coordinator is unreachable; the commit will tell what happened
        except DfsError as e:
            if e.code is Code.UNAVAILABLE:
                raise TransactionLost(e.code, e.msg) from None
            raise


async def _abort_quietly(client: Client, txid: int) -> None:
    """Best effort, even while being cancelled: the coordinator expires it anyway."""
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await client.abort(txid)
        except DfsError as e:
            log.debug("abort of txid %d failed: %s", txid, e)


async def _learn_outcome(client: Client, txid: int) -> str:
    """The outcome of a commit whose reply was lost: 'committed' or 'aborted'."""
    with trio.move_on_after(client.commit_timeout):
        while (state := await client.outcome(txid)) == "inflight":
            await trio.sleep(OUTCOME_POLL)
        if state == "unknown":
            # Neither retried nor reported as failed: it may well have landed.
            raise DfsError(Code.UNAVAILABLE, f"the outcome of transaction {txid} is unknown: "
                                             "its record expired before the commit reply came")
        return state
    raise DfsError(Code.UNAVAILABLE, f"the outcome of transaction {txid} is still unknown")


async def read_committed(client: Client, read: Callable[[], Awaitable[T]]) -> T:
    """`read()` after OUTCOME said a write whose reply was lost committed. The coordinator that
    answered may go at once, so a failure here is asked again until commit_timeout, and in the
    end is CommittedUnread: never the write's failure, which would be retried or reported as
    failed although it landed (simulator seed 20183)."""
    last = "no reply"
    with trio.move_on_after(client.commit_timeout):
        while True:
            try:
                return await read()
            except DfsError as e:
                if e.code is not Code.UNAVAILABLE:
                    raise CommittedUnread(e.code, f"committed, but reading it back failed: "
                                                  f"{e.msg}") from None
                last = e.msg
            await trio.sleep(OUTCOME_POLL)
    raise CommittedUnread(Code.UNAVAILABLE, f"committed, but reading it back failed: {last}")


async def write_file(
    client: Client,
    ino: int,
    source: BinaryIO,
    *,
    base_version: int | None = None,
    if_version: bool = False,
    mtime_ns: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Attr:
    """See Client.write_file."""
    exclude: set[int] = set()
    last: DfsError | None = None
    full = False  # some replica had no room: if no placement works, that is the answer
    for attempt in range(client.attempts):
        if attempt:
            await trio.sleep(min(BACKOFF * 2 ** (attempt - 1), MAX_BACKOFF))
        try:
            txid, replicas = await client.begin(ino, base_version, if_version, sorted(exclude))
        except DfsError as e:
            if e.code is not Code.UNAVAILABLE:
                raise
            # Maybe too few nodes are left without the excluded ones: let the coordinator
            # place freely (its failure detector knows who is down by now).
            last, exclude = e, set()
            continue
        try:
            staged = await stage(client, txid, replicas, source, progress)
        except TransactionLost as e:
            log.info("txid %d: %s; starting over", txid, e.msg)
            last = e
            continue
        except ReplicaFailed as f:
            log.info("txid %d: %s; retrying without node %d", txid, f, f.node_id)
            await _abort_quietly(client, txid)
            last = f.error
            full = full or f.error.code is Code.ENOSPC
            exclude.add(f.node_id)
            continue
        except BaseException:
            await _abort_quietly(client, txid)
            raise
        try:
            return await client.commit(
                txid, staged.size, staged.checksum, staged.nchunks, mtime_ns,
                voted=list(staged.voted),
            )
        except NotSent as e:
            # No coordinator could be reached: the commit never went out, nothing to settle.
            await _abort_quietly(client, txid)
            last = e
        except PeerUnavailable as e:
            # The reply was lost (the leader may have died): ask the leader there is now.
            if await _learn_outcome(client, txid) == "committed":
                return await read_committed(client, lambda: client.getattr(ino))
            last = e
        except DfsError as e:
            failed = [int(n) for n in e.details.get("failed") or ()]
            # A replica's NO that is about the replica (it lost or dropped the staged chunks),
            # not about the file, is worth a retry elsewhere, as UNAVAILABLE always is.
            if e.code is not Code.UNAVAILABLE and not (
                failed and e.code in (Code.ENOENT, Code.CONFLICT)
            ):
                raise
            log.info("txid %d: commit failed (%s); retrying without %s", txid, e, failed)
            last = e
            exclude.update(failed)
    # ENOSPC stays ENOSPC when no placement had room; anything else is UNAVAILABLE.
    code = Code.ENOSPC if full else Code.UNAVAILABLE
    raise DfsError(
        code,
        f"write of inode {ino} failed after {client.attempts} attempts: "
        f"{last.msg if last else 'no attempt'}",
    )
