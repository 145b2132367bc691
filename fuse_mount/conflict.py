"""Conflicting writers (docs/mount.md, "Conflicting writers"): which commits are conditional.

With `on_conflict=fail` (the mount's `--on-conflict`, or the xattr `user.dfs.on_conflict` on a
directory, inherited by subdirectories: the nearest ancestor that sets it wins), a handle's
commit carries `if_version` on the version the handle opened, and the coordinator refuses it
(CONFLICT) when another writer committed in between: close()/fsync() then return ESTALE and the
other writer's version stays. `overwrite` is last-writer-wins, as before.

The policy is looked up only for a handle that has something to commit, per directory, in one
round trip however deep the tree (`getxattr` with `inherit`: the coordinator climbs the
ancestors), and cached for the attribute timeout: a change made on another mount is seen
within that time, one made through this mount at once.
"""

from __future__ import annotations

import errno
import logging
import time

from dfs.client import Client
from dfs.errors import Code, DfsError
from fuse_mount.remote import Remote

log = logging.getLogger(__name__)

ON_CONFLICT = b"user.dfs.on_conflict"
FAIL = "fail"
OVERWRITE = "overwrite"
CHOICES = (FAIL, OVERWRITE)
#: What close()/fsync() return for a refused commit (why ESTALE: docs/mount.md).
CONFLICT_ERRNO = errno.ESTALE
#: Directories whose inherited policy is remembered; beyond this the memory starts over.
POLICY_CACHE_MAX = 4096


async def getxattr_inherited(client: Client, ino: int, name: bytes) -> bytes:
    """name on directory ino or its nearest ancestor that has it (named for `user.dfs.calls`)."""
    return bytes((await client.query("getxattr", ino=ino, name=name, inherit=True))["value"])


class ConflictPolicy:
    """The effective on_conflict of each directory, cached for `ttl` seconds."""

    def __init__(self, default: str, client: Client, remote: Remote, ttl: float) -> None:
        if default not in CHOICES:
            raise ValueError(f"on_conflict is one of {', '.join(CHOICES)}, not {default!r}")
        self.default = default
        self.ttl = ttl
        self._client = client
        self._remote = remote
        self._cache: dict[int, tuple[str | None, float]] = {}
        self._generation = 0

    async def fails(self, directory: int) -> bool:
        """Whether a commit of a file in `directory` must not overwrite another writer's."""
        hit = self._cache.get(directory)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.ttl:
            value = hit[0]
        else:
            generation = self._generation
            value = await self._fetch(directory)
            if generation == self._generation:  # else a change here raced the lookup
                if len(self._cache) >= POLICY_CACHE_MAX:
                    self._cache.clear()
                self._cache[directory] = (value, now)
        return (value or self.default) == FAIL

    async def _fetch(self, directory: int) -> str | None:
        try:
            raw = await self._remote.call(getxattr_inherited, self._client, directory,
                                          ON_CONFLICT)
        except DfsError as e:
            if e.code in (Code.ENODATA, Code.ENOENT):  # unset, or the directory is gone
                return None
            raise
        value = raw.decode(errors="replace")
        if value not in CHOICES:  # the coordinator refuses other values; be safe anyway
            log.warning("directory %d: ignoring %s=%r", directory, ON_CONFLICT.decode(), value)
            return None
        return value

    def forget(self) -> None:
        """A policy or a directory's place changed on this mount: look every one up again."""
        self._cache.clear()
        self._generation += 1
