"""The vocabulary of a multi-file transaction, shared by the client and the coordinator:
its operations, its named limits and how a path splits into (parent, name)."""

from __future__ import annotations

from typing import Any

from dfs.errors import Code, DfsError

#: Write members (files) of one multi-file transaction.
MAX_TXN_FILES = 64
#: Operations (writes, removes, renames, mkdirs) of one multi-file transaction.
MAX_TXN_OPS = 256
#: Bytes of all write members of one multi-file transaction together.
MAX_TXN_BYTES = 1 << 30

OPS = ("write", "remove", "rename", "mkdir")
NAME_MAX = 255


def split_path(path: Any) -> tuple[str, bytes]:
    """'/a/b/c' -> ('/a/b', b'c'): the parent to resolve and the name in it."""
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise DfsError(Code.EINVAL, f"not an absolute path to a name: {path!r}")
    head, _, tail = path.rstrip("/").rpartition("/")
    name = tail.encode("utf-8", "surrogateescape")
    if name in (b".", b"..") or b"\0" in name or len(name) > NAME_MAX:
        raise DfsError(Code.EINVAL, f"not a valid name: {tail!r}")
    return head or "/", name
