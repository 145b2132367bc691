"""The inode record and the name rules: what every table of the namespace stores or checks
(dfs/meta/inode.py keeps the table of live inodes, dfs/meta/snapshots.py snapshots' copies)."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, fields
from typing import Any

from dfs.errors import Code, DfsError
from dfs.meta.codec import pack, unpack

ROOT_INO = 1
NAME_MAX = 255
SYMLINK_MAX = 4096
XATTR_VALUE_MAX = 64 * 1024
# The first readdir cookie of a directory; 1 and 2 stay free for a client's "." and "..".
FIRST_COOKIE = 3
# The metadata-only kinds (FIFOs, devices, sockets): the kernel serves their data, dfs only
# stores the inode; devices also keep their device number (`rdev`).
SPECIAL_KINDS = frozenset({stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK})
DEVICE_KINDS = frozenset({stat.S_IFCHR, stat.S_IFBLK})
RDEV_MAX = (1 << 64) - 1


#: Names no entry may take: a mount shows every directory's kept versions and snapshots under
#: them (docs/mount.md, "Versions and snapshots"), so a real entry could never clash with them.
RESERVED_NAMES = frozenset({b".versions", b".snapshots"})


def validate_new_name(name: bytes) -> bytes:
    """A name an entry is about to take: valid, and not one of the mount's virtual ones."""
    validate_name(name)
    if name in RESERVED_NAMES:
        raise DfsError(Code.EINVAL, f"{name.decode()} is reserved: a mount shows a "
                                    "directory's versions and snapshots there")
    return name


def shown(name: bytes | str) -> str:
    """A name as a user reads it in a message: its text in double quotes, never a bytes repr
    (undecodable bytes as \\x escapes)."""
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
    return f'"{text}"'


def validate_name(name: bytes) -> bytes:
    """A directory entry name (docs/design.md §3): 1-255 bytes, no '/', no NUL, not '.' or '..'."""
    if not isinstance(name, bytes):
        raise DfsError(Code.EINVAL, f"a name must be bytes, not {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise DfsError(Code.ENAMETOOLONG, f"name of {len(name)} bytes (limit {NAME_MAX})")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise DfsError(Code.EINVAL, f"invalid name {shown(name)}")
    return name


@dataclass(slots=True)
class Inode:
    """One inode record. Directories also carry `parent` and `next_cookie`; a regular file
    carries `parent` too: the directory of its first name, where its inherited policies
    (`user.dfs.keep_versions`) are looked up (0 in records from before). `unwritten`: a file
    created for a writer that has not committed its first content yet (docs/design.md §6,
    "A new file appears with its content"): clients other than its creator do not see it."""

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
    replicas: list[int] = field(default_factory=list)
    target: bytes | None = None
    generation: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    parent: int = 0
    next_cookie: int = FIRST_COOKIE
    rdev: int = 0
    unwritten: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_special(self) -> bool:
        """A FIFO, device or socket: an inode with no content in dfs."""
        return stat.S_IFMT(self.mode) in SPECIAL_KINDS

    def attr(self) -> dict[str, Any]:
        """The wire `attr` map (docs/protocol.md), without xattrs or directory bookkeeping."""
        return {
            "ino": self.ino,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "nlink": self.nlink,
            "size": self.size,
            "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "version": self.version,
            "blob": self.blob,
            "checksum": self.checksum,
            "replicas": list(self.replicas),
            "target": self.target,
            "generation": self.generation,
            "rdev": self.rdev,
            "unwritten": self.unwritten,
        }

    def encode(self) -> bytes:
        record = {f.name: getattr(self, f.name) for f in _FIELDS if f.name != "ino"}
        if not self.is_dir:
            del record["next_cookie"]
            if not (self.is_reg and self.parent):
                del record["parent"]
        if not self.rdev:
            del record["rdev"]
        if not self.unwritten:
            del record["unwritten"]
        return pack(record)

    @classmethod
    def decode(cls, ino: int, data: bytes) -> Inode:
        record = unpack(data)
        return cls(ino=ino, **{k: v for k, v in record.items() if k in _NAMES})


_FIELDS = fields(Inode)
_NAMES = frozenset(f.name for f in _FIELDS)
