"""The client library: one method per coordinator op, plus whole-file writes and reads.

Used by the CLI and the FUSE mount. Metadata goes to the leading coordinator (of a list: the
link follows it, dfs/client/leader.py); file bytes go straight to the storage nodes
(docs/design.md §1). Idempotent requests retry on UNAVAILABLE for a bounded time; requests that
change the namespace are sent once, since a lost reply leaves their effect unknown and a blind
retry could apply them twice (a request a standby refused, or that never went out, is resent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, BinaryIO

import trio

from dfs.client import read, write
from dfs.client.attr import Attr
from dfs.client.leader import FAILOVER_FOR, LeaderLink
from dfs.client.transaction import Transaction, read_consistent
from dfs.errors import Code, DfsError
from dfs.rpc import Peer, Peers
from dfs.unwritten import MAX_KEEP, UNWRITTEN_LEASE_S

Progress = Callable[[int], Any]
# How long a node table may be reused before an unknown node id forces a refresh anyway.
log = logging.getLogger(__name__)
NODE_TABLE_MIN_AGE = 0.5
#: Files created unwritten that one client remembers as its own (a few MB at most).
MAX_UNWRITTEN = 65536


def _fields(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("ok", "id")}


class Client:
    """A connection to one cluster: `async with Client("A,B,C", secret) as c: ...`.

    `coordinators`: one HOST:PORT, "A,B,C" or a list; calls go to whichever leads, followed
    through failovers (dfs/client/leader.py)."""

    def __init__(
        self,
        coordinators: str | Sequence[str],
        secret: bytes,
        *,
        timeout: float = 10.0,
        retry_for: float = 15.0,
        commit_timeout: float = 120.0,
        window: int = 8,
        readahead: int = 8,
        attempts: int = 5,
        failover_for: float = FAILOVER_FOR,
    ) -> None:
        self.timeout = timeout
        self.retry_for = retry_for
        self.keepalive = 2.0  # seconds between `touch`es while staging; begin replies set it
        self.commit_timeout = commit_timeout
        self.window = window
        self.readahead = readahead
        self.attempts = attempts
        self.peers = Peers(secret, timeout=timeout)
        self.coordinator = LeaderLink(coordinators, secret, timeout=timeout,
                                      failover_for=failover_for)
        self._nodes: dict[int, str] = {}
        self._nodes_at = -1e9
        # Files this client created unwritten: it sees them, nobody else does (docs/design.md
        # §6, "A new file appears with its content"). One is forgotten at its first commit; a
        # creator with more than MAX_UNWRITTEN at once no longer sees its oldest.
        self._unwritten: dict[int, None] = {}
        # The coordinator's lease on them (its create reply says): renewed every quarter.
        self.unwritten_lease_s = UNWRITTEN_LEASE_S

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def address(self) -> str:
        """The coordinator currently used: the leader, as far as this client knows."""
        return self.coordinator.address

    async def aclose(self) -> None:
        await self.coordinator.aclose()
        await self.peers.aclose()

    # ------------------------------------------------------------ plumbing

    async def query(self, op: str, **fields: Any) -> dict[str, Any]:
        """An idempotent coordinator request: retried on UNAVAILABLE for up to retry_for."""
        return _fields(await self.coordinator.call(op, retry_for=self.retry_for, **fields))

    async def change(self, op: str, **fields: Any) -> dict[str, Any]:
        """A request that changes state: sent once (its effect is unknown if the reply is lost)."""
        return _fields(await self.coordinator.call(op, **fields))

    # ------------------------------------------------------------ namespace

    def shown(self, attr: Attr) -> bool:
        """Whether this client sees the file: not one another client created and has not
        written yet."""
        return not attr.unwritten or attr.ino in self._unwritten

    def _visible(self, wire: dict[str, Any]) -> Attr:
        attr = Attr.from_wire(wire)
        if not self.shown(attr):
            raise DfsError(Code.ENOENT, f"no such file: inode {attr.ino} was created by another "
                                        "client and has no content committed yet")
        return attr

    async def getattr(self, ino: int) -> Attr:
        return self._visible((await self.query("getattr", ino=ino))["attr"])

    async def lookup(self, parent: int, name: bytes, *, created_here: bool = False) -> Attr:
        """`created_here`: after a create whose reply was lost, an unwritten file found there
        is taken as the one this client created."""
        wire = (await self.query("lookup", parent=parent, name=name))["attr"]
        if created_here and wire.get("unwritten"):
            self._remember_unwritten(wire["ino"])
        return self._visible(wire)

    async def resolve(self, path: str) -> Attr:
        return self._visible((await self.query("resolve", path=path))["attr"])

    async def readdir(
        self, ino: int, after: int = 0, limit: int = 1000
    ) -> list[tuple[bytes, int, Attr]]:
        """One page of (name, cookie, attr) after the cookie `after`, in cookie order; fewer
        than `limit` only at the directory's end. Files other clients are creating are left
        out (and the page filled up past them)."""
        out: list[tuple[bytes, int, Attr]] = []
        while True:
            reply = await self.query("readdir", ino=ino, after=after, limit=limit)
            raw = reply["entries"]
            for name, cookie, wire in raw:
                attr = Attr.from_wire(wire)
                if self.shown(attr) and len(out) < limit:
                    out.append((name, cookie, attr))
            if len(out) >= limit or len(raw) < limit:
                return out
            after = raw[-1][1]

    async def listdir(self, ino: int, page: int = 1000) -> list[tuple[bytes, Attr]]:
        """Every entry of a directory, paging through readdir."""
        entries: list[tuple[bytes, Attr]] = []
        after = 0
        while True:
            batch = await self.readdir(ino, after, page)
            entries.extend((name, attr) for name, _, attr in batch)
            if len(batch) < page:
                return entries
            after = batch[-1][1]

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        reply = await self.change("mkdir", parent=parent, name=name, mode=mode, uid=uid, gid=gid)
        return Attr.from_wire(reply["attr"])

    async def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, exclusive: bool = True,
        unwritten: bool = False,
    ) -> Attr:
        """`unwritten`: a new file stays hidden from every other client until its first
        commit (write_file), so nobody ever sees it empty; an existing file is opened as is."""
        # Without `exclusive` a create opens what is there, so sending it twice does what
        # sending it once does: it is retried like a read across a lost reply or a failover.
        send = self.change if exclusive else self.query
        reply = await send(
            "create", parent=parent, name=name, mode=mode, uid=uid, gid=gid, exclusive=exclusive,
            unwritten=unwritten,
        )
        attr = Attr.from_wire(reply["attr"])
        if attr.unwritten:
            self._remember_unwritten(attr.ino)
            self.unwritten_lease_s = float(reply.get("unwritten_lease_s", UNWRITTEN_LEASE_S))
        return attr

    def _remember_unwritten(self, ino: int) -> None:
        self._unwritten[ino] = None
        while len(self._unwritten) > MAX_UNWRITTEN:
            del self._unwritten[next(iter(self._unwritten))]

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        reply = await self.change(
            "symlink", parent=parent, name=name, target=target, uid=uid, gid=gid
        )
        return Attr.from_wire(reply["attr"])

    async def mknod(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        """A FIFO, socket or device node (mode carries the type; rdev only for devices)."""
        reply = await self.change(
            "mknod", parent=parent, name=name, mode=mode, rdev=rdev, uid=uid, gid=gid
        )
        return Attr.from_wire(reply["attr"])

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        reply = await self.change("link", ino=ino, parent=parent, name=name)
        return Attr.from_wire(reply["attr"])

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.change("unlink", parent=parent, name=name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.change("rmdir", parent=parent, name=name)

    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        await self.change(
            "rename", parent=parent, name=name, new_parent=new_parent, new_name=new_name,
            flags=flags,
        )

    async def setattr(self, ino: int, **fields: int | bool | None) -> Attr:
        """Change any of mode, uid, gid, atime_ns, mtime_ns, ctime_ns, size (0 = truncate);
        kill_suid=True drops the set-ID bits as an unprivileged write does."""
        given = {k: v for k, v in fields.items() if v is not None}
        return Attr.from_wire((await self.change("setattr", ino=ino, **given))["attr"])

    async def readlink(self, ino: int) -> bytes:
        return (await self.query("readlink", ino=ino))["target"]

    async def statfs(self) -> dict[str, Any]:
        return await self.query("statfs")

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return (await self.query("getxattr", ino=ino, name=name))["value"]

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        await self.change("setxattr", ino=ino, name=name, value=value, flags=flags)

    async def listxattr(self, ino: int) -> list[bytes]:
        return list((await self.query("listxattr", ino=ino))["names"])

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self.change("removexattr", ino=ino, name=name)

    # ------------------------------------------------------------ transactions

    async def begin(
        self,
        ino: int,
        base_version: int | None = None,
        if_version: bool = False,
        exclude: list[int] | None = None,
    ) -> tuple[int, list[tuple[int, str]]]:
        """Start a write: (txid, [(node id, address)] of the R replicas to stage to)."""
        reply = await self.change(
            "begin", ino=ino, base_version=base_version, if_version=if_version,
            exclude=list(exclude or ()),
        )
        replicas = [(r["id"], r["address"]) for r in reply["replicas"]]
        self._nodes.update(replicas)
        if isinstance(reply.get("keepalive_s"), int | float) and reply["keepalive_s"] > 0:
            self.keepalive = float(reply["keepalive_s"])
        return reply["txid"], replicas

    async def commit(
        self, txid: int, size: int, checksum: bytes, nchunks: int, mtime_ns: int | None = None,
        voted: list[int] | None = None,
    ) -> Attr:
        """`voted`: replicas that already voted YES in a STAGE carrying the prepare fields
        (docs/design.md §5, rule 2); the coordinator sends PREPARE only to the others."""
        fields: dict[str, Any] = dict(txid=txid, size=size, checksum=checksum, nchunks=nchunks)
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        if voted:
            fields["voted"] = list(voted)
        reply = await self.coordinator.call("commit", timeout=self.commit_timeout, **fields)
        return Attr.from_wire(reply["attr"])

    async def abort(self, txid: int) -> None:
        await self.change("abort", txid=txid)

    def transaction(self) -> Transaction:
        """Several files in one atomic commit: `async with client.transaction() as t:`
        (dfs/client/transaction.py, docs/client.md)."""
        return Transaction(self)

    async def read_consistent(self, paths: list[str]) -> dict[str, bytes]:
        """Several whole files as of one decision point (dfs/client/transaction.py)."""
        return await read_consistent(self, paths)

    async def outcome(self, txid: int) -> str:
        """'committed', 'aborted', 'inflight' (ask again later) or 'unknown' (the decision's
        record expired: the writer asked later than the coordinator's txn retention)."""
        return (await self.query("outcome", txid=txid, writer=True))["state"]

    async def write_file(
        self,
        ino: int,
        source: BinaryIO,
        *,
        base_version: int | None = None,
        if_version: bool = False,
        mtime_ns: int | None = None,
        progress: Progress | None = None,
    ) -> Attr:
        """Replace the file's content with all of `source` (read from offset 0) atomically."""
        attr = await write.write_file(
            self, ino, source, base_version=base_version, if_version=if_version,
            mtime_ns=mtime_ns, progress=progress,
        )
        self.forget_unwritten(ino)
        return attr

    async def keep_unwritten(self, inos: list[int] | None = None) -> None:
        """Renew the leases of files this client created unwritten (all of them by default):
        one a creator stops renewing counts as abandoned after the coordinator's
        --unwritten-lease, and its name may be taken (dfs/unwritten.py)."""
        inos = list(self._unwritten) if inos is None else inos
        for start in range(0, len(inos), MAX_KEEP):
            await self.query("keep_unwritten", inos=inos[start:start + MAX_KEEP])

    @asynccontextmanager
    async def keeping_unwritten(self, inos: list[int]) -> AsyncIterator[None]:
        """Renew these unwritten files' leases while the block runs (a long first write).
        Error policy: a renewal that fails is dropped; the write itself reports trouble."""

        async def renew() -> None:
            while True:
                await trio.sleep(self.unwritten_lease_s / 4)
                with contextlib.suppress(DfsError):
                    await self.keep_unwritten(inos)

        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew)
            try:
                yield
            except Exception as e:
                failed = e  # raised as itself below, not inside an ExceptionGroup
            finally:
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed

    async def remove_unwritten(self, parent: int, name: bytes, ino: int,
                               timeout_s: float) -> bool:
        """A creator gives up the file it created unwritten: remove `name` if it still names
        that inode and it never got content (best effort within timeout_s, shielded: a
        leftover stays hidden and its lease frees the name). True if it was removed."""
        removed = False
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            try:
                found = await self.lookup(parent, name)
                if found.ino == ino and found.unwritten:
                    await self.unlink(parent, name)
                    removed = True
            except DfsError as e:
                log.info("unwritten inode %d was not removed: %s", ino, e)
        self.forget_unwritten(ino)
        return removed

    def forget_unwritten(self, ino: int) -> None:
        """The file was written (everyone sees it now) or given up."""
        self._unwritten.pop(ino, None)

    async def read_chunk(self, attr: Attr, index: int) -> bytes:
        """Chunk `index` of the version `attr` describes, verified; fails over between replicas."""
        return await read.read_chunk(self, attr, index)

    # ------------------------------------------------------------ versions

    async def versions(self, ino: int) -> list[Attr]:
        """The file's retained versions, newest first, each as the attrs of the file at that
        version (read one with `read_file`); the current version is `getattr`."""
        current = await self.getattr(ino)
        wire = (await self.query("versions", ino=ino))["versions"]
        return [_as_version(current, v) for v in wire]

    async def history(self, ino: int) -> list[Attr]:
        """The current version and the retained ones, newest first, in two round trips
        (what a mount lists under `.versions`); a version committed in between is missed,
        never listed twice."""
        current = await self.getattr(ino)
        wire = (await self.query("versions", ino=ino))["versions"]
        return [current, *(_as_version(current, v) for v in wire
                           if v["version"] != current.version)]

    async def version(self, ino: int, version: int) -> Attr:
        """The file at `version` (retained or current), to read with `read_file`."""
        current = await self.getattr(ino)
        return _as_version(current, (await self.query("version", ino=ino, version=version))[
            "version"])

    async def restore(self, ino: int, version: int) -> Attr:
        """Make version N's content the file's new current version (no data is copied)."""
        return Attr.from_wire((await self.change("restore", ino=ino, version=version))["attr"])

    # ------------------------------------------------------------ snapshots

    async def snapshot_create(self, path: str, name: bytes, *, timeout: float = 600.0
                              ) -> dict[str, Any]:
        """A read-only, point-in-time copy of the subtree at path, reachable as
        PATH/.snapshots/NAME (metadata only; the coordinator takes seconds per 10^5 files)."""
        return await self.coordinator.call("snapshot_create", timeout=timeout, path=path,
                                           name=name)

    async def snapshot_list(self, path: str | None = None) -> list[dict[str, Any]]:
        fields = {} if path is None else {"path": path}
        return list((await self.query("snapshot_list", **fields))["snapshots"])

    async def snapshot_delete(self, path: str, name: bytes, *, timeout: float = 600.0
                              ) -> dict[str, Any]:
        return await self.coordinator.call("snapshot_delete", timeout=timeout, path=path,
                                           name=name)

    async def snapshot_restore(self, path: str, name: bytes, *, timeout: float = 600.0
                               ) -> dict[str, Any]:
        """Make the live subtree at path what snapshot NAME holds, in one transaction."""
        return await self.coordinator.call("snapshot_restore", timeout=timeout, path=path,
                                           name=name)

    async def read_file(
        self, attr: Attr, sink: BinaryIO | Callable[[bytes], Any], progress: Progress | None = None
    ) -> int:
        """Stream the whole version `attr` describes into `sink`; returns the bytes written."""
        return await read.read_file(self, attr, sink, progress)

    # ------------------------------------------------------------ cluster

    async def status(self) -> dict[str, Any]:
        return await self.query("status")

    async def coordinator_info(self, address: str | None = None) -> dict[str, Any]:
        """One coordinator's role ("leader" / "standby"), its address and the leader it knows:
        of `address` itself, not followed (default: the one in use)."""
        peer = self.coordinator.peer(address or self.address)
        return _fields(await peer.call("coordinator_info", retry_for=self.retry_for))

    async def txn_list(self) -> list[dict[str, Any]]:
        return list((await self.query("txn_list"))["txns"])

    async def node_list(self) -> list[dict[str, Any]]:
        nodes = list((await self.query("node_list"))["nodes"])
        self._nodes = {n["id"]: n["address"] for n in nodes}
        self._nodes_at = trio.current_time()
        return nodes

    async def node_drain(self, node_id: int) -> None:
        await self.change("node_drain", node_id=node_id)

    async def node_remove(self, node_id: int) -> None:
        await self.change("node_remove", node_id=node_id)

    async def report_bad(self, ino: int, version: int, node_id: int, reason: str) -> None:
        await self.change("report_bad", ino=ino, version=version, node_id=node_id, reason=reason)

    # ------------------------------------------------------------ storage nodes

    async def refresh_nodes(self) -> None:
        """Re-read the node table unless it was read moments ago (nodes may move ports)."""
        if trio.current_time() - self._nodes_at >= NODE_TABLE_MIN_AGE:
            await self.node_list()

    async def node(self, node_id: int) -> Peer:
        """The connection pool of a storage node, by id (from the cached node table)."""
        if node_id not in self._nodes:
            await self.refresh_nodes()
        address = self._nodes.get(node_id)
        if address is None:
            raise DfsError(Code.UNAVAILABLE, f"node {node_id} is not in the node table")
        return self.peers[address]


def _as_version(current: Attr, version: dict[str, Any]) -> Attr:
    """The file's attrs with one version's content fields (what reading it needs)."""
    return dataclasses.replace(
        current, version=version["version"], blob=version.get("blob"), size=version["size"],
        checksum=version.get("checksum"), replicas=tuple(version.get("replicas") or ()),
        mtime_ns=version.get("mtime_ns", current.mtime_ns))
