"""A lock per key (a txid, an inode) that exists only while someone holds or awaits it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import trio


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[trio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def busy(self, key: Hashable) -> bool:
        """Someone holds or awaits key's lock (a caller that must not wait can skip it)."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)
