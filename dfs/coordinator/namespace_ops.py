"""Namespace op handlers (docs/protocol.md): each is one LMDB transaction.

Reads run on the trio thread (LMDB reads are mmap lookups); writes go through the group-
committing writer and are forced before the reply, so an acknowledged mkdir/rename/... is
durable. Bad input is refused by the typed request accessors and the namespace's own checks
before anything is written (I5).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore
from dfs.rpc import Request
from dfs.unwritten import MAX_KEEP, UnwrittenLeases

Reply = dict[str, Any]
log = logging.getLogger(__name__)


class NamespaceOps:
    store: MetaStore
    unwritten: UnwrittenLeases

    async def _write(self, fn: Any) -> Any:
        now = runtime.wall_ns()
        return await self.store.db.write(lambda txn: fn(txn, now))

    async def _write_new(self, parent: int, name: bytes, fn: Any) -> Any:
        """A change that makes `name` in `parent`: an abandoned unwritten file there gives the
        name up first, in the same transaction (dfs/unwritten.py)."""
        clock = trio.current_time()

        def both(txn: Any, now: int) -> Any:
            self._reclaim(txn, parent, name, now, clock)
            return fn(txn, now)

        return await self._write(both)

    def _reclaim(self, txn: Any, parent: int, name: bytes, now_ns: int, clock: float) -> None:
        ns = self.store.namespace
        try:
            entry = ns.entries.find(txn, parent, name)
        except DfsError:
            return  # a bad name: the change itself refuses it
        inode = None if entry is None else ns.inodes.find(txn, entry.ino)
        if inode is not None and inode.unwritten and self.unwritten.abandoned(inode.ino, clock):
            ns.unlink(txn, parent, name, now_ns)
            self.unwritten.forget(inode.ino)
            log.info("unwritten inode %d under %r in directory %d: its creator renewed no lease "
                     "for %.0f s; the name is taken over", inode.ino, name, parent,
                     self.unwritten.lease_s)

    async def op_keep_unwritten(self, req: Request) -> Reply:
        """A creator renews the leases of its unwritten files (no metadata changes)."""
        inos = req.list("inos", [])
        if len(inos) > MAX_KEEP or not all(isinstance(i, int) and not isinstance(i, bool)
                                           for i in inos):
            raise DfsError(Code.BAD_REQUEST, f"keep_unwritten: at most {MAX_KEEP} inode numbers")
        self.unwritten.renew(inos)
        return {}

    def _read(self, fn: Any) -> Any:
        return self.store.db.read(fn)

    # ------------------------------------------------------------ reads

    async def op_getattr(self, req: Request) -> Reply:
        ino = req.int("ino")
        return {"attr": self._read(lambda t: self.store.namespace.getattr(t, ino))}

    async def op_lookup(self, req: Request) -> Reply:
        parent, name = req.int("parent"), req.name()
        return {"attr": self._read(lambda t: self.store.namespace.lookup(t, parent, name))}

    async def op_resolve(self, req: Request) -> Reply:
        path = req.str("path")
        return {"attr": self._read(lambda t: self.store.namespace.resolve(t, path))}

    async def op_readdir(self, req: Request) -> Reply:
        ino, after, limit = req.int("ino"), req.int("after", 0), req.int("limit", 256)
        return {"entries": self._read(
            lambda t: self.store.namespace.readdir(t, ino, after, limit))}

    async def op_readlink(self, req: Request) -> Reply:
        ino = req.int("ino")
        return {"target": self._read(lambda t: self.store.namespace.readlink(t, ino))}

    async def op_getxattr(self, req: Request) -> Reply:
        ino, name = req.int("ino"), req.bytes("name")
        ns = self.store.namespace
        if req.bool("inherit", False):  # the nearest ancestor's (policy xattrs)
            return {"value": self._read(lambda t: ns.getxattr_inherited(t, ino, name))}
        return {"value": self._read(lambda t: ns.getxattr(t, ino, name))}

    async def op_versions(self, req: Request) -> Reply:
        """The file's retained versions, newest first (docs/protocol.md, "Coordinator ops")."""
        ino = req.int("ino")
        ns = self.store.namespace
        return {"versions": [v.to_json() for v in self._read(lambda t: ns.versions(t, ino))]}

    async def op_version(self, req: Request) -> Reply:
        """One version to read (retained or current): where its blob's copies are."""
        ino, version = req.int("ino"), req.int("version")
        ns = self.store.namespace
        return {"version": self._read(lambda t: ns.version(t, ino, version)).to_json()}

    async def op_listxattr(self, req: Request) -> Reply:
        ino = req.int("ino")
        return {"names": self._read(lambda t: self.store.namespace.listxattr(t, ino))}

    # ------------------------------------------------------------ writes

    async def op_restore(self, req: Request) -> Reply:
        """Version N's content as the new current version: one forced transaction, no data
        copied (the blob is shared with the retained version)."""
        ino, version = req.int("ino"), req.int("version")
        ns = self.store.namespace
        return {"attr": await self._write(lambda t, now: ns.restore(t, ino, version, now))}

    async def op_mkdir(self, req: Request) -> Reply:
        parent, name, mode = req.int("parent"), req.name(), req.int("mode")
        uid, gid = req.int("uid", 0), req.int("gid", 0)
        ns = self.store.namespace
        return {"attr": await self._write_new(parent, name,
            lambda t, now: ns.mkdir(t, parent, name, mode, uid, gid, now))}

    async def op_create(self, req: Request) -> Reply:
        parent, name, mode = req.int("parent"), req.name(), req.int("mode")
        uid, gid = req.int("uid", 0), req.int("gid", 0)
        exclusive, unwritten = req.bool("exclusive", True), req.bool("unwritten", False)
        ns = self.store.namespace
        attr = await self._write_new(
            parent, name,
            lambda t, now: ns.create(t, parent, name, mode, uid, gid, now, exclusive, unwritten))
        if not attr["unwritten"]:
            return {"attr": attr}
        self.unwritten.renew([attr["ino"]])  # its creator holds it from now
        return {"attr": attr, "unwritten_lease_s": self.unwritten.lease_s}

    async def op_symlink(self, req: Request) -> Reply:
        parent, name, target = req.int("parent"), req.name(), req.bytes("target")
        uid, gid = req.int("uid", 0), req.int("gid", 0)
        ns = self.store.namespace
        return {"attr": await self._write_new(parent, name,
            lambda t, now: ns.symlink(t, parent, name, target, uid, gid, now))}

    async def op_mknod(self, req: Request) -> Reply:
        parent, name, mode = req.int("parent"), req.name(), req.int("mode")
        rdev, uid, gid = req.int("rdev", 0), req.int("uid", 0), req.int("gid", 0)
        ns = self.store.namespace
        return {"attr": await self._write_new(parent, name,
            lambda t, now: ns.mknod(t, parent, name, mode, rdev, uid, gid, now))}

    async def op_link(self, req: Request) -> Reply:
        ino, parent, name = req.int("ino"), req.int("parent"), req.name()
        ns = self.store.namespace
        return {"attr": await self._write_new(
            parent, name, lambda t, now: ns.link(t, ino, parent, name, now))}

    async def op_unlink(self, req: Request) -> Reply:
        parent, name = req.int("parent"), req.name()
        ns = self.store.namespace
        await self._write(lambda t, now: ns.unlink(t, parent, name, now))
        return {}

    async def op_rmdir(self, req: Request) -> Reply:
        parent, name = req.int("parent"), req.name()
        ns = self.store.namespace
        await self._write(lambda t, now: ns.rmdir(t, parent, name, now))
        return {}

    async def op_rename(self, req: Request) -> Reply:
        parent, name = req.int("parent"), req.name()
        new_parent, new_name = req.int("new_parent"), req.name("new_name")
        flags = req.int("flags", 0)
        ns = self.store.namespace
        await self._write(
            lambda t, now: ns.rename(t, parent, name, new_parent, new_name, flags, now))
        return {}

    async def op_setattr(self, req: Request) -> Reply:
        ino = req.int("ino")
        changes = {key: req.int(key) for key in
                   ("mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "size")
                   if req.msg.get(key) is not None}
        if req.bool("kill_suid"):
            changes["kill_suid"] = 1
        ns = self.store.namespace
        return {"attr": await self._write(lambda t, now: ns.setattr(t, ino, changes, now))}

    async def op_setxattr(self, req: Request) -> Reply:
        ino, name, value = req.int("ino"), req.bytes("name"), req.bytes("value")
        flags = req.int("flags", 0)
        ns = self.store.namespace
        await self._write(lambda t, now: ns.setxattr(t, ino, name, value, flags, now))
        return {}

    async def op_removexattr(self, req: Request) -> Reply:
        ino, name = req.int("ino"), req.bytes("name")
        ns = self.store.namespace
        await self._write(lambda t, now: ns.removexattr(t, ino, name, now))
        return {}
