"""Several files in one atomic commit, client side (docs/design.md §5, docs/client.md).

    async with client.transaction() as t:
        t.write("/a", b"new a", if_version=3)
        t.write("/b", open("b.local", "rb"))
        t.remove("/old")
        t.rename("/tmp.txt", "/final.txt")
        t.mkdir("/dir")
    # left the block: all of it committed, in one decision; or an exception and none of it

Calls inside the block only record the operations; leaving it begins one write per file
(BEGIN, its own txid and replicas), stages every file to its replicas (a few at once), then
sends ONE `commit_txn` naming every operation in order. The coordinator prepares the union
of the replicas and writes one decision that applies everything, or aborts everything.
An exception inside the block (or `t.abort()`) commits nothing.

A replica that fails while staging, or a NO vote about a replica, aborts every member and
starts the whole transaction over with a placement without that node, as a single write does.
A lost commit reply is settled by asking the outcome of a member (one decision: one answer).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from dfs import runtime
from dfs.client import write
from dfs.client.attr import Attr
from dfs.client.tasks import task_group
from dfs.errors import Code, DfsError
from dfs.rpc import PeerUnavailable
from dfs.txnops import MAX_TXN_BYTES, MAX_TXN_FILES, MAX_TXN_OPS, split_path

if TYPE_CHECKING:
    from dfs.client.client import Client

log = logging.getLogger(__name__)

__all__ = ["MAX_TXN_BYTES", "MAX_TXN_FILES", "MAX_TXN_OPS", "Transaction"]

#: Member files staged at once (each streams with the client's own window).
STAGE_PARALLEL = 4


@dataclass
class _Write:
    path: str
    source: BinaryIO
    if_version: int | None
    mode: int
    size: int
    txid: int = 0
    ino: int = 0
    replicas: tuple[tuple[int, str], ...] = ()
    staged: write.Staged | None = None


class OutcomeUnknown(DfsError):
    """The commit's reply was lost and its outcome could not be learned: not retried."""


class _BeginFailed(Exception):
    """A member's BEGIN found no placement (UNAVAILABLE): retry with no exclusions."""

    def __init__(self, error: DfsError) -> None:
        super().__init__(error.msg)
        self.error = error


def _size(source: BinaryIO) -> int:
    position = source.seek(0, io.SEEK_END)
    source.seek(0)
    return position


class Transaction:
    """The operations of one multi-file commit; see the module docstring."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._ops: list[dict[str, Any] | _Write] = []
        self._done = False
        #: After a commit: each written or created path's new attributes.
        self.attrs: dict[str, Attr] = {}
        # The commit's reply was lost and OUTCOME said "committed": `attrs` are the files as
        # they are now, which may be later versions than the ones this transaction made, and
        # leave out paths renamed or removed since, or all of them when the coordinator could
        # not be asked again within commit_timeout (the transaction committed all the same).
        self.settled_by_outcome = False

    # ------------------------------------------------------------ recording

    def write(self, path: str, source: bytes | BinaryIO, *, if_version: int | None = None,
              mode: int = 0o644) -> None:
        """Replace (or create) `path` with all of `source`. `if_version=N`: only if the file
        is at version N when the transaction decides (0: only if it does not exist)."""
        split_path(path)
        if any(isinstance(op, _Write) and op.path == path for op in self._ops):
            raise DfsError(Code.EINVAL, f"{path} is written twice in one transaction")
        stream: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
        self._add(_Write(path, stream, if_version, mode, _size(stream)))

    def remove(self, path: str) -> None:
        """Unlink a file (or remove an empty directory)."""
        split_path(path)
        self._add({"op": "remove", "path": path})

    def rename(self, src: str, dst: str) -> None:
        """Rename, replacing an existing `dst` as POSIX rename does."""
        split_path(src)
        split_path(dst)
        self._add({"op": "rename", "src": src, "dst": dst})

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        split_path(path)
        self._add({"op": "mkdir", "path": path, "mode": mode,
                   "uid": os.getuid(), "gid": os.getgid()})

    def _add(self, op: dict[str, Any] | _Write) -> None:
        """Record one operation, enforcing the named limits at once (TOO_BIG)."""
        if self._done:
            raise DfsError(Code.EINVAL, "the transaction is already committed or aborted")
        writes = [o for o in [*self._ops, op] if isinstance(o, _Write)]
        if len(self._ops) + 1 > MAX_TXN_OPS:
            raise DfsError(Code.TOO_BIG, f"a transaction holds at most {MAX_TXN_OPS} "
                                         "operations (MAX_TXN_OPS)")
        if len(writes) > MAX_TXN_FILES:
            raise DfsError(Code.TOO_BIG, f"a transaction writes at most {MAX_TXN_FILES} files "
                                         "(MAX_TXN_FILES)")
        total = sum(w.size for w in writes)
        if total > MAX_TXN_BYTES:
            raise DfsError(Code.TOO_BIG, f"a transaction writes at most {MAX_TXN_BYTES} bytes "
                                         f"(MAX_TXN_BYTES), not {total}")
        self._ops.append(op)

    # ------------------------------------------------------------ the block

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            self.abort()
            return
        await self.commit()

    def abort(self) -> None:
        """Commit nothing (nothing was begun yet: the block only records)."""
        self._done = True
        self._ops.clear()

    async def commit(self) -> dict[str, Attr]:
        """Commit every operation in one decision, or raise and commit none."""
        if self._done:
            raise DfsError(Code.EINVAL, "the transaction is already committed or aborted")
        self._done = True
        if not self._ops:
            return {}
        client = self.client
        exclude: set[int] = set()
        last: DfsError | None = None
        for attempt in range(client.attempts):
            if attempt:
                await trio.sleep(min(write.BACKOFF * 2 ** (attempt - 1), write.MAX_BACKOFF))
            try:
                return await self._attempt(exclude)
            except write.ReplicaFailed as f:
                log.info("transaction: %s; retrying without node %d", f, f.node_id)
                last = f.error
                exclude.add(f.node_id)
            except write.TransactionLost as e:
                last = e
            except OutcomeUnknown:
                raise
            except _BeginFailed as b:
                # Maybe too few nodes are left without the excluded ones: let the
                # coordinator place freely (its failure detector knows who is down by now).
                last = b.error
                exclude.clear()
            except DfsError as e:
                failed = [int(n) for n in e.details.get("failed") or ()]
                if e.code is not Code.UNAVAILABLE and not (
                        failed and e.code in (Code.ENOENT, Code.CONFLICT)):
                    raise
                last = e
                exclude.update(failed)
        raise DfsError(Code.UNAVAILABLE, f"transaction failed after {client.attempts} "
                                         f"attempts: {last.msg if last else 'no attempt'}")

    async def _attempt(self, exclude: set[int]) -> dict[str, Attr]:
        writes = [op for op in self._ops if isinstance(op, _Write)]
        try:
            for w in writes:
                try:
                    await self._begin(w, exclude)
                except DfsError as e:
                    if e.code is not Code.UNAVAILABLE:
                        raise
                    raise _BeginFailed(e) from None
            await self._stage_all(writes)
            return await self._commit(writes)
        except BaseException:
            with trio.CancelScope(shield=True):
                for w in writes:
                    if w.txid:
                        await write._abort_quietly(self.client, w.txid)
            raise
        finally:
            for w in writes:
                w.txid, w.staged = 0, None

    async def _begin(self, w: _Write, exclude: set[int]) -> None:
        client = self.client
        try:
            attr: Attr | None = await client.resolve(w.path)
        except DfsError as e:
            if e.code is not Code.ENOENT:
                raise
            attr = None  # a new file: the decision creates it
        if attr is not None and not attr.is_file():
            raise DfsError(Code.EISDIR, f"{w.path} is not a regular file")
        w.ino = attr.ino if attr is not None else 0
        current = attr.version if attr is not None else 0
        base = w.if_version if w.if_version is not None else current
        w.txid, replicas = await client.begin(w.ino, base, w.if_version is not None,
                                              sorted(exclude))
        w.replicas = tuple(replicas)

    async def _stage_all(self, writes: list[_Write]) -> None:
        limit = trio.Semaphore(STAGE_PARALLEL)

        async def one(w: _Write) -> None:
            async with limit:
                await runtime.in_thread(w.source.seek, 0)
                w.staged = await write.stage(self.client, w.txid, list(w.replicas), w.source,
                                             None)

        async with task_group() as group:
            for w in writes:
                group.start_soon(one, w)

    def _wire_ops(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for op in self._ops:
            if isinstance(op, _Write):
                assert op.staged is not None
                out.append({"op": "write", "txid": op.txid, "path": op.path, "mode": op.mode,
                            "uid": os.getuid(), "gid": os.getgid(), "size": op.staged.size,
                            "checksum": op.staged.checksum, "nchunks": op.staged.nchunks,
                            "voted": list(op.staged.voted)})
            else:
                out.append(op)
        return out

    async def _commit(self, writes: list[_Write]) -> dict[str, Attr]:
        client = self.client
        ops = self._wire_ops()
        try:
            reply = await client.coordinator.call("commit_txn", timeout=client.commit_timeout,
                                                  ops=ops)
        except PeerUnavailable as lost:
            if not writes:
                raise OutcomeUnknown(Code.UNAVAILABLE, "the transaction's reply was lost: "
                                     f"whether it was applied is unknown ({lost.msg})") from None
            try:
                state = await write._learn_outcome(client, writes[0].txid)
            except DfsError as e:
                # Never retried: the first attempt may have landed (and a retry under
                # if_version would conflict with it, or report it failed).
                raise OutcomeUnknown(Code.UNAVAILABLE, f"the transaction's outcome is unknown: "
                                     f"{e.msg}") from None
            if state != "committed":
                raise
            # One decision: a member committed, so all did. From here nothing may fail the
            # transaction (a failure would be retried, or reported, although it landed).
            for w in writes:
                w.txid = 0  # nothing to abort
            self.settled_by_outcome = True
            try:
                self.attrs = await write.read_committed(client, lambda: self._attrs_now(writes))
            except write.CommittedUnread as e:
                log.warning("transaction: %s", e.msg)
                self.attrs = {}
            return self.attrs
        for w in writes:
            w.txid = 0  # decided: nothing to abort
        attrs = {}
        for op, attr in zip(ops, reply["attrs"], strict=True):
            if attr is not None:
                attrs[op["path"]] = Attr.from_wire(attr)
        self.attrs = attrs
        return attrs


    async def _attrs_now(self, writes: list[_Write]) -> dict[str, Attr]:
        """The written paths' attributes as they are now, leaving out any renamed or removed
        since (by this transaction's own later operations, or by others)."""
        out: dict[str, Attr] = {}
        for w in writes:
            try:
                out[w.path] = await self.client.resolve(w.path)
            except DfsError as e:
                if e.code is Code.UNAVAILABLE:
                    raise
        return out


async def read_consistent(client: Client, paths: list[str]) -> dict[str, bytes]:
    """Several files' contents as of ONE decision point: one `resolve_many` (one read
    transaction of the coordinator) names every version, then each is read. A version
    deleted meanwhile (GC after its grace period: ESTALE) starts it over, a few times."""
    for _ in range(client.attempts):
        reply = await client.query("resolve_many", paths=list(paths))
        attrs = [Attr.from_wire(a) for a in reply["attrs"]]
        out: dict[str, bytes] = {}
        try:
            for path, attr in zip(paths, attrs, strict=True):
                if not attr.is_file():
                    raise DfsError(Code.EISDIR, f"{path} is not a regular file")
                sink = io.BytesIO()
                await client.read_file(attr, sink)
                out[path] = sink.getvalue()
        except DfsError as e:
            if e.code is not Code.ESTALE:
                raise
            continue
        return out
    raise DfsError(Code.ESTALE, "the files kept changing faster than they could be read")
