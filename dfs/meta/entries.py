"""Directory entries and their readdir cookies.

`dentries`: parent (u64 BE) + name -> child ino (u64 BE) + cookie (u64 BE).
`dircookies`: parent (u64 BE) + cookie (u64 BE) -> name.

Each entry gets the directory's next cookie, never reused (the counter lives in the
directory's inode), so a readdir that resumes "after cookie c" neither repeats nor skips an
entry that existed throughout, whatever is created or deleted meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import lmdb

from dfs.db import Database
from dfs.meta.codec import U64x2, k64
from dfs.meta.inode import Inode


@dataclass(frozen=True, slots=True)
class Entry:
    parent: int
    name: bytes
    ino: int
    cookie: int


class EntryTable:
    def __init__(self, db: Database) -> None:
        self._dentries = db["dentries"]
        self._cookies = db["dircookies"]

    def find(self, txn: lmdb.Transaction, parent: int, name: bytes) -> Entry | None:
        raw = txn.get(k64(parent) + name, db=self._dentries)
        if raw is None:
            return None
        ino, cookie = U64x2.unpack(raw)
        return Entry(parent, name, ino, cookie)

    def add(self, txn: lmdb.Transaction, directory: Inode, name: bytes, ino: int) -> Entry:
        """Insert a new entry; the caller stores `directory` (its cookie counter moved on)."""
        cookie = directory.next_cookie
        directory.next_cookie += 1
        self._put(txn, Entry(directory.ino, name, ino, cookie))
        return Entry(directory.ino, name, ino, cookie)

    def repoint(self, txn: lmdb.Transaction, entry: Entry, ino: int) -> Entry:
        """The same name and cookie now name another inode (RENAME_EXCHANGE)."""
        new = Entry(entry.parent, entry.name, ino, entry.cookie)
        self._put(txn, new)
        return new

    def remove(self, txn: lmdb.Transaction, entry: Entry) -> None:
        txn.delete(k64(entry.parent) + entry.name, db=self._dentries)
        txn.delete(U64x2.pack(entry.parent, entry.cookie), db=self._cookies)

    def is_empty(self, txn: lmdb.Transaction, directory: int) -> bool:
        prefix = k64(directory)
        with txn.cursor(db=self._cookies) as cur:
            return not (cur.set_range(prefix) and cur.key().startswith(prefix))

    def list(self, txn: lmdb.Transaction, directory: int, after: int, limit: int) -> list[Entry]:
        """Up to `limit` entries with cookie > after, in cookie order."""
        out: list[Entry] = []
        prefix = k64(directory)
        if after >= 2**64 - 1:
            return out
        with txn.cursor(db=self._cookies) as cur:
            if not cur.set_range(U64x2.pack(directory, after + 1)):
                return out
            for key, name in cur:
                if len(out) >= limit or not key.startswith(prefix):
                    break
                entry = self.find(txn, directory, name)
                if entry is not None:
                    out.append(entry)
        return out

    def _put(self, txn: lmdb.Transaction, entry: Entry) -> None:
        txn.put(k64(entry.parent) + entry.name, U64x2.pack(entry.ino, entry.cookie),
                db=self._dentries)
        txn.put(U64x2.pack(entry.parent, entry.cookie), entry.name, db=self._cookies)

