"""File attributes as the coordinator sends them (docs/protocol.md, "Attributes")."""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from typing import Any

_KINDS = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket", stat.S_IFCHR: "char-device", stat.S_IFBLK: "block-device",
}
_SPECIAL = frozenset({stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK})


@dataclass(frozen=True, slots=True)
class Attr:
    """One inode's attributes: exactly the fields of the wire `attr` map."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    version: int = 0
    blob: int | None = None
    checksum: bytes | None = None
    replicas: tuple[int, ...] = field(default_factory=tuple)
    target: bytes | None = None
    generation: int = 0
    rdev: int = 0
    # Created for a writer whose first content is not committed yet: shown only to the client
    # that created it (Client.create with unwritten=True); to the others it does not exist.
    unwritten: bool = False

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Attr:
        """Build from a reply's `attr` map; unknown keys (newer servers) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in wire.items() if k in known and v is not None}
        if "replicas" in values:
            values["replicas"] = tuple(values["replicas"])
        return cls(**values)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_special(self) -> bool:
        """A FIFO, device or socket: metadata only, its data never passes through dfs."""
        return stat.S_IFMT(self.mode) in _SPECIAL

    @property
    def kind(self) -> str:
        """The word scripts see in --json output: 'dir', 'file', 'symlink', 'fifo', 'socket',
        'char-device', 'block-device' (or 'other' for a type dfs does not make)."""
        return _KINDS.get(stat.S_IFMT(self.mode), "other")

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: checksum as hex, the symlink target as a str (surrogateescape)."""
        doc = dataclasses.asdict(self)
        doc["type"] = self.kind
        doc["checksum"] = self.checksum.hex() if self.checksum is not None else None
        doc["target"] = os.fsdecode(self.target) if self.target is not None else None
        doc["replicas"] = list(self.replicas)
        if stat.S_IFMT(self.mode) in (stat.S_IFCHR, stat.S_IFBLK):
            doc["major"], doc["minor"] = os.major(self.rdev), os.minor(self.rdev)
        return doc
