"""What a server process takes from its host: wall time and worker threads.

Servers read the wall clock and start worker threads only through this module, so the
simulator (dfs/sim, docs/design.md §10) can run the very same server code under trio's
MockClock: there, wall time follows the virtual clock and "threads" run inline, which keeps
one seed to one trace. In production these are the plain standard-library calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Host:
    """The real host: the system clock and trio's worker threads."""

    def wall_ns(self) -> int:
        return time.time_ns()

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)


_host: Host = Host()


def wall_ns() -> int:
    """Nanoseconds since the epoch (for records kept on disk: decided, ended, due times)."""
    return _host.wall_ns()


def wall() -> float:
    return _host.wall_ns() / 1e9


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work (LMDB write batches, hashing, bulk file I/O) off the trio thread."""
    return await _host.in_thread(fn, *args)


def install(host: Host) -> Host:
    """Replace the host (the simulator does); returns the previous one to put back."""
    global _host
    previous, _host = _host, host
    return previous
