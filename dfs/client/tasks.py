"""Sibling tasks that fail as one plain exception, not an ExceptionGroup.

The read and write pipelines run several tasks (a reader, workers, a writer); when one fails the
others are pointless. Callers want the first failure itself (a DfsError or OSError they can
handle or print), so a failing task records its error and cancels its siblings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio


class TaskGroup:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.error: Exception | None = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.nursery.start_soon(self._guarded, fn, args)

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception as e:  # any failure ends the group; the first one is what the caller sees
            if self.error is None:
                self.error = e
            self.nursery.cancel_scope.cancel()


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    """Run tasks started on the yielded group; raise the first one's exception after all end."""
    async with trio.open_nursery() as nursery:
        group = TaskGroup(nursery)
        yield group
    if group.error is not None:
        raise group.error
