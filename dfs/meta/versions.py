"""Retained versions: the last K contents of a file kept after a newer one replaced them.

docs/coordinator.md, "Version history". Every version of a file is already an immutable blob
named by the transaction that wrote it; keeping one is keeping its blob's record instead of
queueing the blob for GC. Two sub-databases, both changed only in the transaction that changes
the file (a commit, a truncate, a restore, the file's deletion):

- `versions`: ino + version (u64 BE each) -> {blob, size, checksum, replicas, mtime_ns,
  retained_ns}: the file's old contents, oldest first in key order.
- `retained`: blob + ino + version -> empty: which retained versions name a blob. With the
  `blobs` index (a file's current blob) it answers "who still needs this blob?", the
  reference count the GC, OUTCOME and the checker ask before a copy may go. A restore makes a
  blob current again while a retained version still names it, so a blob can have several
  holders; the copies are deleted only when it has none.

A blob with no holder never gains one (a restore takes a retained version's blob; nothing else
names an old blob), which is why the GC may delete such a blob without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lmdb

from dfs.db import Database
from dfs.errors import Code, DfsError
from dfs.meta.codec import U64x2, U64x3, held_by, k64, pack, unpack
from dfs.meta.gcqueue import GcQueue

#: The most versions a file keeps besides its current one (`--keep-versions`, the xattr).
KEEP_VERSIONS_MAX = 1000


@dataclass(slots=True)
class Version:
    """One retained content of file `ino`: what reading it needs, and when it was replaced."""

    ino: int
    version: int
    blob: int | None
    size: int
    checksum: bytes | None
    replicas: list[int] = field(default_factory=list)
    mtime_ns: int = 0
    retained_ns: int = 0

    def key(self) -> bytes:
        return U64x2.pack(self.ino, self.version)

    def encode(self) -> bytes:
        return pack({"blob": self.blob, "size": self.size, "checksum": self.checksum,
                     "replicas": list(self.replicas), "mtime_ns": self.mtime_ns,
                     "retained_ns": self.retained_ns})

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> Version:
        ino, version = U64x2.unpack(key)
        record = unpack(value)
        return cls(ino, version, record.get("blob"), record.get("size", 0),
                   record.get("checksum"), list(record.get("replicas") or ()),
                   record.get("mtime_ns", 0), record.get("retained_ns", 0))

    def to_json(self) -> dict[str, Any]:
        """The wire form (`versions`, `version_attr`): an attr a client can read from."""
        return {"ino": self.ino, "version": self.version, "blob": self.blob,
                "size": self.size, "checksum": self.checksum,
                "replicas": list(self.replicas), "mtime_ns": self.mtime_ns,
                "retained_ns": self.retained_ns}


def validate_keep(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or \
            not 0 <= value <= KEEP_VERSIONS_MAX:
        raise DfsError(Code.EINVAL, f"keep_versions is a number from 0 to {KEEP_VERSIONS_MAX}")
    return value


class VersionTable:
    """The `versions` and `retained` sub-databases (see the module doc)."""

    def __init__(self, db: Database, gc: GcQueue, gc_grace_ns: int) -> None:
        self._db = db["versions"]
        self._retained = db["retained"]
        self._gc = gc
        self.gc_grace_ns = gc_grace_ns

    # ------------------------------------------------------------ reads

    def list(self, txn: lmdb.Transaction, ino: int) -> list[Version]:
        """The file's retained versions, newest first."""
        out: list[Version] = []
        with txn.cursor(db=self._db) as cur:
            if not cur.set_range(k64(ino)):
                return out
            for key, value in cur:
                if U64x2.unpack(key)[0] != ino:
                    break
                out.append(Version.decode(bytes(key), value))
        out.reverse()
        return out

    def find(self, txn: lmdb.Transaction, ino: int, version: int) -> Version | None:
        raw = txn.get(U64x2.pack(ino, version), db=self._db)
        return None if raw is None else Version.decode(U64x2.pack(ino, version), raw)

    def holders(self, txn: lmdb.Transaction, blob: int) -> list[Version]:
        """Every retained version that names `blob` (usually none or one)."""
        found = (self.find(txn, ino, version)
                 for ino, version in list(held_by(txn, self._retained, blob)))
        return [v for v in found if v is not None]

    def count(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self._db)["entries"]

    # ------------------------------------------------------------ changes

    def retain(self, txn: lmdb.Transaction, version: Version, keep: int, now_ns: int) -> None:
        """Keep `version` (the file's content being replaced), then drop the oldest beyond
        `keep`. keep 0 keeps nothing: the content is dropped at once, as before versions."""
        version.retained_ns = now_ns
        self._put(txn, version)
        kept = self.list(txn, version.ino)
        for old in kept[keep:]:
            self.drop(txn, old, now_ns)

    def put(self, txn: lmdb.Transaction, version: Version) -> None:
        """Rewrite a retained version in place (a repair changed its replicas)."""
        self._put(txn, version)

    def drop(self, txn: lmdb.Transaction, version: Version, now_ns: int) -> None:
        """Forget a retained version; its blob's copies go to the GC queue (which keeps any a
        current file or another retained version still lists)."""
        txn.delete(version.key(), db=self._db)
        if version.blob is None:
            return
        txn.delete(U64x3.pack(version.blob, version.ino, version.version), db=self._retained)
        not_before = now_ns + self.gc_grace_ns
        for node in version.replicas:
            self._gc.add(txn, not_before, node, version.blob, version.ino)

    def drop_all(self, txn: lmdb.Transaction, ino: int, now_ns: int) -> int:
        """The file is gone: so are its retained versions."""
        versions = self.list(txn, ino)
        for version in versions:
            self.drop(txn, version, now_ns)
        return len(versions)

    def _put(self, txn: lmdb.Transaction, version: Version) -> None:
        txn.put(version.key(), version.encode(), db=self._db)
        if version.blob is not None:
            txn.put(U64x3.pack(version.blob, version.ino, version.version), b"",
                    db=self._retained)
