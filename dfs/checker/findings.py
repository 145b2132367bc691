"""What `dfs check` can find, one record per problem, per file and node (docs/checker.md).

The kind names are part of the `--json` contract: scripts match on them.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    MISSING = "missing_replica"  # a listed replica's node has no (prepared) copy, or is gone
    SIZE = "size_mismatch"  # the node's copy records another size than the file's
    CHECKSUM = "checksum_mismatch"  # another checksum recorded, or (--deep) bytes hash wrong
    CORRUPT = "corrupt_chunk"  # --deep: chunks failing their digest (named in `chunks`)
    UNDER = "under_replicated"  # a replica on a down node, or fewer than R listed
    LOST = "lost_file"  # no good replica anywhere: reported, never "repaired"
    ORPHAN = "orphan_blob"  # a committed blob nothing references, not in flight, not in GC
    STAGED = "stale_staged"  # a STAGED leftover of no transaction in flight
    PREPARED = "stale_prepared"  # a PREPARED leftover of no transaction in flight
    DANGLING = "dangling_entry"  # a directory entry naming a missing inode (or in a missing dir)
    UNLINKED = "unlinked_inode"  # an inode no directory entry names
    REFCOUNT = "reference_count"  # an index of kept versions or snapshots out of step (held.py)


# A copy on a live node that is not what the file says: the replica needs re-copying.
BAD_COPY = frozenset({Kind.MISSING, Kind.SIZE, Kind.CHECKSUM, Kind.CORRUPT})
REPLICA_KINDS = BAD_COPY | {Kind.UNDER}
BLOB_KINDS = frozenset({Kind.ORPHAN, Kind.STAGED, Kind.PREPARED})
NAMESPACE_KINDS = frozenset({Kind.DANGLING, Kind.UNLINKED})

LABELS = {
    Kind.MISSING: "missing replica",
    Kind.SIZE: "size mismatch",
    Kind.CHECKSUM: "checksum mismatch",
    Kind.CORRUPT: "corrupt chunk",
    Kind.UNDER: "under-replicated",
    Kind.LOST: "lost file",
    Kind.ORPHAN: "orphan blob",
    Kind.STAGED: "stale STAGED leftover",
    Kind.PREPARED: "stale PREPARED leftover",
    Kind.DANGLING: "dangling entry",
    Kind.UNLINKED: "inode with no entry",
    Kind.REFCOUNT: "reference count drift",
}


@dataclass
class Finding:
    kind: Kind
    ino: int | None = None
    node: int | None = None
    blob: int | None = None
    detail: str = ""
    chunks: list[int] = field(default_factory=list)
    path: str | None = None
    parent: int | None = None  # dangling entries: where the entry is
    name: bytes | None = None
    fixed: bool | None = None  # None: no repair was asked for
    fix: str = ""  # what the repair did, or why it could not

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.ino, self.node, self.blob, self.parent, self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "ino": self.ino,
            "path": self.path,
            "node": self.node,
            "blob": self.blob,
            "detail": self.detail,
            "chunks": self.chunks,
            "entry": None if self.parent is None else {
                "parent": self.parent, "name": os.fsdecode(self.name or b"")},
            "fixed": self.fixed,
            "fix": self.fix,
        }
