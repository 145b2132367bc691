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


class _Slot:
    """One chunk being fetched ahead of the consumer."""

    __slots__ = ("data", "ready")

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.data = b""


async def in_order(total: int, window: int, fetch: Callable[[int], Awaitable[bytes]],
                   consume: Callable[[int, bytes], Awaitable[None]]) -> None:
    """fetch(0..total-1) with up to `window` chunks in flight, and consume(index, data) each
    in order as it arrives: the readers' pipeline (the client's reads, the mount's verified
    fill). The first failure of either side ends it and is raised as itself."""
    slots, ready_in_order = trio.open_memory_channel[_Slot](max(window - 1, 0))

    async with task_group() as group:

        async def get(index: int, slot: _Slot) -> None:
            slot.data = await fetch(index)
            slot.ready.set()

        async def schedule() -> None:
            async with slots:
                for index in range(total):
                    slot = _Slot()
                    await slots.send(slot)
                    group.start_soon(get, index, slot)

        async def hand_on() -> None:
            async with ready_in_order:
                index = 0
                async for slot in ready_in_order:
                    await slot.ready.wait()
                    data, slot.data = slot.data, b""
                    await consume(index, data)
                    index += 1

        group.start_soon(schedule)
        group.start_soon(hand_on)
