"""Paged walks over the whole namespace and GC queue, for the checker and re-replication.

Each call reads one page in the caller's read transaction and says where the next starts, so a
walk of 10^5 inodes is a few dozen short reads (the coordinator's event loop stays free between
pages) and a few dozen round trips for a remote checker, never one per file. Pages are not one
snapshot: callers that judge what they saw confirm their findings afterwards (docs/checker.md).
"""

from __future__ import annotations

from typing import Any

import lmdb

from dfs.db import Database
from dfs.meta.codec import U64x2, U64x3, k64, unk64
from dfs.meta.inode import Inode
from dfs.meta.versions import Version

PAGE_MAX = 10_000


def inode_row(inode: Inode) -> list[Any]:
    """The wire form of one inode for a checker: what replica checks and fsck need."""
    return [inode.ino, inode.mode, inode.nlink, inode.version, inode.blob, inode.size,
            inode.checksum, list(inode.replicas), inode.parent]


class MetaScan:
    def __init__(self, db: Database) -> None:
        self._inodes = db["inodes"]
        self._dentries = db["dentries"]
        self._gc = db["gc"]
        self._versions = db["versions"]
        self._blobs = db["blobs"]

    def inodes(self, txn: lmdb.Transaction, after: int, limit: int) -> list[Inode]:
        """Up to `limit` inodes with ino > after, in ino order."""
        out: list[Inode] = []
        limit = max(1, min(limit, PAGE_MAX))
        if after >= 2**64 - 1:
            return out
        with txn.cursor(db=self._inodes) as cur:
            if not cur.set_range(k64(after + 1)):
                return out
            for key, value in cur:
                out.append(Inode.decode(unk64(key), value))
                if len(out) >= limit:
                    break
        return out

    def versions(self, txn: lmdb.Transaction, after: bytes, limit: int
                 ) -> tuple[list[Version], bytes | None]:
        """Retained versions after the key `after` (b"": from the start), in (ino, version)
        order, and the key to continue after (None at the end)."""
        rows, last = self._page(txn, self._versions, after, limit,
                                lambda k, v: Version.decode(bytes(k), v))
        return rows, last

    def blob_files(self, txn: lmdb.Transaction, after: int, limit: int
                   ) -> tuple[list[Inode], int | None]:
        """The files whose current blob id is > after, in blob id order, from the `blobs`
        index: (inodes, the blob id to continue after, or None at the end). At most `limit`
        index entries are read, so a page costs the same whatever the index holds (an entry
        whose inode is gone or moved on is skipped: its copies are orphans)."""
        out: list[Inode] = []
        limit = max(1, min(limit, PAGE_MAX))
        if after >= 2**64 - 1:
            return out, None
        seen = 0
        with txn.cursor(db=self._blobs) as cur:
            if not cur.set_range(k64(after + 1)):
                return out, None
            for key, value in cur:
                blob, seen = unk64(key), seen + 1
                raw = txn.get(value, db=self._inodes)
                if raw is not None:
                    inode = Inode.decode(unk64(value), raw)
                    if inode.blob == blob and inode.is_reg:
                        out.append(inode)
                if seen >= limit:
                    return out, blob
        return out, None

    def indexed(self, txn: lmdb.Transaction, inode: Inode) -> bool:
        """Whether a file's current blob is in the `blobs` index (what `blob_files` walks)."""
        if not inode.is_reg or inode.blob is None:
            return True
        return txn.get(k64(inode.blob), db=self._blobs) == k64(inode.ino)

    def dentries(self, txn: lmdb.Transaction, after: bytes, limit: int,
                 within: int | None = None) -> tuple[list[list[Any]], bytes | None]:
        """([[parent, name, ino], ...], the key to continue after, or None at the end);
        with `within`, only the entries of that directory."""
        prefix = None if within is None else k64(within)
        if prefix is not None and not after.startswith(prefix):
            after = prefix  # not a key itself (names are never empty): the first entry is next
        return self._page(txn, self._dentries, after, limit,
                          lambda k, v: [unk64(k), bytes(k[8:]), U64x2.unpack(v)[0]], prefix)

    def gc(self, txn: lmdb.Transaction, after: bytes, limit: int
           ) -> tuple[list[list[Any]], bytes | None]:
        """([[node, blob], ...] of queued deletions, continue-after key or None)."""
        return self._page(txn, self._gc, after, limit,
                          lambda k, v: list(U64x3.unpack(k)[1:]))

    @staticmethod
    def _page(txn: lmdb.Transaction, db: Any, after: bytes, limit: int, row: Any,
              prefix: bytes | None = None) -> tuple[list[list[Any]], bytes | None]:
        out: list[list[Any]] = []
        limit = max(1, min(limit, PAGE_MAX))
        last: bytes | None = None
        with txn.cursor(db=db) as cur:
            found = cur.set_range(after) if after else cur.first()
            if found and after and cur.key() == after:
                found = cur.next()
            while found:
                key, value = cur.item()
                if prefix is not None and not bytes(key).startswith(prefix):
                    return out, None
                out.append(row(key, value))
                last = bytes(key)
                if len(out) >= limit:
                    return out, last
                found = cur.next()
        return out, None
