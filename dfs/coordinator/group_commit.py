"""The multi-file commit, coordinator side: drives `dfs.twopc_group` (docs/design.md §5).

A client begins one ordinary write per member file (BEGIN, its own txid and replicas) and
stages them; `commit_txn` then names the members and the namespace operations, in order, and
gets one answer. The driver checks what it can before any PREPARE (every member's
if_version, the limits), hands the members to the machine, PREPAREs on the union of their
replicas, and on the machine's `WriteGroupDecision` forces ONE LMDB write that applies the
operations in order: each write member's inode switch (or its creation) and COMMITTED record
(tagged with the group), each remove / rename / mkdir. Anything that write refuses (a
member moved on under if_version, a name that is taken or gone) rolls all of it back, and the
machine aborts every member. After the decision each member is delivered, acked, ended and
recovered like any single write: its record is an ordinary COMMITTED record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
import trio

from dfs import runtime
from dfs.chunks import shape_problem
from dfs.errors import Code, DfsError, InDoubt
from dfs.failpoints import failpoint
from dfs.meta import TxnRecord, TxnState
from dfs.meta.attrs import moved_on
from dfs.metrics.coordinator import abort_reason
from dfs.twopc import MemberCommit, SendCommit
from dfs.txnops import MAX_TXN_BYTES, MAX_TXN_FILES, MAX_TXN_OPS, OPS, split_path

if TYPE_CHECKING:
    from dfs.meta.inode import Inode

    from .commit import CommitDriver
    from .transactions import OpenTxn

log = logging.getLogger(__name__)

#: Groups remembered by their first member's txid, so a duplicated `commit_txn` gets the
#: first one's answer (txids are never reused: a real retry begins new members).
GROUPS_REMEMBERED = 1024

@dataclass(eq=False)
class OpenGroup:
    """A multi-file commit of this incarnation, undecided (memory only: presumed abort)."""

    gid: int
    ops: list[dict[str, Any]]
    writes: list[dict[str, Any]]
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | DfsError | None = None

    def answer(self, result: dict[str, Any] | DfsError) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    async def wait(self) -> dict[str, Any]:
        await self.done.wait()
        if isinstance(self.result, DfsError):
            raise self.result
        assert self.result is not None
        return self.result


def validate_txn_ops(ops: list[Any]) -> list[dict[str, Any]]:
    """Validate a commit_txn request's shape and limits (BAD_REQUEST / TOO_BIG)."""
    if not ops:
        raise DfsError(Code.BAD_REQUEST, "commit_txn: no operations")
    if len(ops) > MAX_TXN_OPS:
        raise DfsError(Code.TOO_BIG, f"a transaction holds at most {MAX_TXN_OPS} operations "
                                     f"(MAX_TXN_OPS), not {len(ops)}")
    writes = [op for op in ops if isinstance(op, dict) and op.get("op") == "write"]
    if len(writes) > MAX_TXN_FILES:
        raise DfsError(Code.TOO_BIG, f"a transaction writes at most {MAX_TXN_FILES} files "
                                     f"(MAX_TXN_FILES), not {len(writes)}")
    total = 0
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in OPS:
            raise DfsError(Code.BAD_REQUEST, f"commit_txn: an operation is one of {OPS}")
        for key in ("path",) if op["op"] != "rename" else ("src", "dst"):
            split_path(op.get(key))
        if op["op"] == "write":
            for key in ("txid", "size", "nchunks"):
                if not isinstance(op.get(key), int) or isinstance(op.get(key), bool):
                    raise DfsError(Code.BAD_REQUEST, f"commit_txn: a write needs int {key!r}")
            problem = shape_problem(op["size"], op.get("checksum"), op["nchunks"])
            if problem:
                raise DfsError(Code.BAD_REQUEST, f"commit_txn: {problem}")
            total += op["size"]
    if total > MAX_TXN_BYTES:
        raise DfsError(Code.TOO_BIG, f"a transaction writes at most {MAX_TXN_BYTES} bytes "
                                     f"(MAX_TXN_BYTES), not {total}")
    return ops


class GroupCommit:
    """The multi-file half of CommitDriver (mixed in)."""

    async def commit_txn(self: CommitDriver, ops: list[Any]) -> dict[str, Any]:
        """Commit every operation or none; returns {"attrs": [attr or None per op]}."""
        ops = validate_txn_ops(ops)
        writes = [op for op in ops if op["op"] == "write"]
        txids = [op["txid"] for op in writes]
        if len(set(txids)) != len(txids):
            raise DfsError(Code.BAD_REQUEST, "commit_txn: a txid is written twice")
        if txids and txids[0] in self.recent_groups:
            # A duplicate (or retried) request: the first one's answer answers it too.
            return await self.recent_groups[txids[0]].wait()
        group = OpenGroup(0, ops, writes)
        if txids:  # before any await: a duplicate arriving meanwhile must find it
            self.recent_groups[txids[0]] = group
            while len(self.recent_groups) > GROUPS_REMEMBERED:
                self.recent_groups.popitem(last=False)
        try:
            group.gid = await self.txids.allocate()
        except DfsError as e:
            group.answer(e)
            raise
        self.groups[group.gid] = group
        self.spawn(self._run_group, group)
        return await group.wait()

    async def _run_group(self: CommitDriver, group: OpenGroup) -> None:
        members: list[MemberCommit] = []
        try:
            for op in group.writes:
                txn = self.open.get(op["txid"])
                if txn is None or txn.committing:
                    raise DfsError(Code.UNAVAILABLE,
                                   f"transaction {op['txid']} is unknown or was aborted")
                txn.touch()
            # Fail fast, before any PREPARE, when the namespace already says no.
            self.store.db.read(lambda t: self._check_members(t, group))
            await failpoint("coordinator.before_prepare")
        except DfsError as e:
            await self._fail_group(group, e)
            return
        for op in group.writes:
            txn = self.open[op["txid"]]
            txn.size, txn.checksum, txn.nchunks = op["size"], op["checksum"], op["nchunks"]
            txn.mtime_ns = op.get("mtime_ns")
            txn.committing = True  # no expiry, no single commit: the group decides
            txn.commit_asked = trio.current_time()
            voted = tuple(n for n in op.get("voted") or () if isinstance(n, int))
            members.append(MemberCommit(txn.txid, txn.size, txn.checksum, txn.nchunks, voted))
        await self._apply(self.protocol.request_group_commit(group.gid, members))

    async def _fail_group(self: CommitDriver, group: OpenGroup, error: DfsError) -> None:
        """Refused before the machine heard of the group: abort every member."""
        self.groups.pop(group.gid, None)
        group.answer(error)
        for op in group.writes:
            txn = self.open.get(op["txid"])
            if txn is not None and not txn.committing:
                self.open.pop(txn.txid, None)
                self.metrics.aborted(abort_reason(error))
                txn.answer(error)
                await self._apply(self.protocol.abort(txn.txid, error.msg))

    def _check_members(self: CommitDriver, t: lmdb.Transaction, group: OpenGroup) -> None:
        """Every write member's file is writable and, under if_version, still at its base."""
        for op in group.writes:
            txn = self.open[op["txid"]]
            try:
                inode = self._member_inode(t, txn.ino, op["path"])
            except DfsError as e:
                if e.code is not Code.ENOENT or txn.ino:
                    raise
                continue  # its directory may be made by this transaction: the decision says
            if inode is not None:
                self._check_writable(inode)
            _check_base(op["path"], inode, txn)

    def _member_inode(self: CommitDriver, t: lmdb.Transaction, ino: int, path: str) -> Any:
        """The file a write member replaces: its inode from BEGIN, or for a member begun
        as a new file (ino 0), whatever the path names now (None: it is still free)."""
        ns = self.store.namespace
        if ino:
            inode = ns.inodes.find(t, ino)
            if inode is None:
                raise DfsError(Code.ENOENT, f"{path} was deleted during the transaction")
            return inode
        parent, name = split_path(path)
        entry = ns.entries.find(t, ns.resolve(t, parent)["ino"], name)
        return None if entry is None else ns.inodes.get(t, entry.ino)

    async def _decide_group(self: CommitDriver, gid: int, members: tuple[int, ...]) -> None:
        group = self.groups[gid]
        try:
            attrs = await self._force_group_decision(group)
        except InDoubt as e:
            group.answer(e)  # maybe written: no reply, no abort (see CommitDriver._decide)
            return
        except DfsError as e:
            await self._apply(self.protocol.group_decision_refused(gid, e.code, e.msg))
            return
        except Exception as e:  # a bug in the decision write: it rolled back, so abort
            log.exception("decision write for group %d failed", gid)
            await self._apply(self.protocol.group_decision_refused(gid, Code.INTERNAL,
                                                                   repr(e)))
            return
        # The commit point of every member has passed at once (rule 1).
        actions = self.protocol.group_decision_written(gid)
        self.groups.pop(gid, None)
        for t in members:
            txn = self.open.pop(t, None)
            if txn is not None:
                self.metrics.committed(txn.size, trio.current_time() - txn.commit_asked)
                txn.answer({"attr": None})
        per_member: dict[int, list[int]] = {}
        for a in actions:
            if isinstance(a, SendCommit):
                per_member.setdefault(a.txid, []).append(a.node)
        self._delivering.update(per_member)
        try:
            await failpoint("coordinator.after_decision")
            group.answer({"attrs": attrs})
        except DfsError as e:
            group.answer(e)  # like a lost reply: the transaction is durable all the same
        self.spawn(self._deliver_group, per_member)

    async def _force_group_decision(self: CommitDriver, group: OpenGroup
                                    ) -> list[dict[str, Any] | None]:
        """The commit point: ONE forced LMDB write of every operation (rule 1)."""
        await failpoint("coordinator.before_decision")
        now = runtime.wall_ns()
        return await self.store.db.write(lambda t: self._write_group(t, group, now))

    async def _deliver_group(self: CommitDriver, per_member: dict[int, list[int]]) -> None:
        """COMMIT to the union of the members' replicas: the first replica of the first
        member alone, then `coordinator.mid_commit`, then everyone else."""
        items = list(per_member.items())
        if not items:
            return
        first, nodes = items[0]
        self.spawn(self.deliver, first, nodes, True)
        for txid, nodes in items[1:]:
            self.spawn(self.deliver, txid, nodes, False)

    def _write_group(self: CommitDriver, t: lmdb.Transaction, group: OpenGroup, now: int
                     ) -> list[dict[str, Any] | None]:
        """The decision: every operation, in order, in this one LMDB write (rolled back
        whole by any refusal)."""
        ns = self.store.namespace
        members = [op["txid"] for op in group.writes]
        out: list[dict[str, Any] | None] = []
        for op in group.ops:
            kind = op["op"]
            if kind == "write":
                out.append(self._write_member(t, group.gid, members, op, now))
                continue
            if kind == "remove":
                parent, name = split_path(op["path"])
                pino = ns.resolve(t, parent)["ino"]
                entry = ns.entries.find(t, pino, name)
                if entry is None:
                    raise DfsError(Code.ENOENT, f"{op['path']}: no such file or directory")
                if ns.inodes.get(t, entry.ino).is_dir:
                    ns.rmdir(t, pino, name, now)
                else:
                    ns.unlink(t, pino, name, now)
            elif kind == "rename":
                (sp, sn), (dp, dn) = split_path(op["src"]), split_path(op["dst"])
                ns.rename(t, ns.resolve(t, sp)["ino"], sn, ns.resolve(t, dp)["ino"], dn,
                          0, now)
            elif kind == "mkdir":
                parent, name = split_path(op["path"])
                out.append(ns.mkdir(t, ns.resolve(t, parent)["ino"], name,
                                    int(op.get("mode", 0o755)), int(op.get("uid", 0)),
                                    int(op.get("gid", 0)), now))
                continue
            out.append(None)
        return out

    def _write_member(self: CommitDriver, t: lmdb.Transaction, gid: int, members: list[int],
                      op: dict[str, Any], now: int) -> dict[str, Any]:
        ns = self.store.namespace
        txn = self.open[op["txid"]]
        path = op["path"]
        inode = self._member_inode(t, txn.ino, path)
        _check_base(path, inode, txn)
        if inode is None:  # a new file: created here, in the decision
            parent, name = split_path(path)
            ino = ns.create(t, ns.resolve(t, parent)["ino"], name,
                            int(op.get("mode", 0o644)), int(op.get("uid", 0)),
                            int(op.get("gid", 0)), now)["ino"]
        else:
            ino = inode.ino
        attr = ns.install_version(
            t, ino, txn.txid, base_version=txn.base_version, if_version=False,
            size=txn.size, checksum=txn.checksum, replicas=txn.replicas,
            mtime_ns=txn.mtime_ns, now_ns=now)
        self.store.txnlog.record_commit(t, TxnRecord(
            txn.txid, TxnState.COMMITTED, ino, txn.replicas, txn.size, txn.checksum,
            txn.base_version, decided_ns=now, group=gid, members=members))
        return attr


def _check_base(path: str, inode: Inode | None, txn: OpenTxn) -> None:
    """A member's file (None: still free, version 0) under its write's if_version."""
    version = inode.version if inode is not None else 0
    if conflict := moved_on(path, version, txn.base_version, txn.if_version,
                            path=path, version=version):
        raise conflict
