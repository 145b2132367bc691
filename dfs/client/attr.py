"""File attributes as the coordinator sends them (docs/protocol.md, "Attributes")."""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def kind(self) -> str:
        """'dir', 'file', 'symlink' or 'other': the word scripts see in --json output."""
        if self.is_dir():
            return "dir"
        if self.is_file():
            return "file"
        if self.is_symlink():
            return "symlink"
        return "other"

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: checksum as hex, the symlink target as a str (surrogateescape)."""
        doc = dataclasses.asdict(self)
        doc["type"] = self.kind
        doc["checksum"] = self.checksum.hex() if self.checksum is not None else None
        doc["target"] = os.fsdecode(self.target) if self.target is not None else None
        doc["replicas"] = list(self.replicas)
        return doc
