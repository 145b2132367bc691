"""Calls to the cluster that ride out a coordinator restart (docs/design.md §7, §8).

The client library retries idempotent requests itself but sends a namespace change once, since a
lost reply leaves its effect unknown. A mount cannot give up that easily: a `mkdir` issued while
the coordinator restarts should succeed once it is back. So changes are retried here too, for a
bounded time, and a retry that then fails with the error the first attempt would have caused if
it had landed (EEXIST after a create, ENOENT after a remove) counts as done - the NFS
duplicate-request heuristic. After the bound the caller gets EIO, never a hang.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from dfs.client.write import CommittedUnread
from dfs.errors import Code, DfsError
from dfs.rpc import NotSent, PeerUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Codes worth retrying: the request did not reach the coordinator, or a replica was unreachable.
TRANSIENT = frozenset({Code.UNAVAILABLE})
_NETWORK = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class MaybeDone(Exception):
    """A change whose first attempt was lost in transit and whose retry found it already done."""


class Remote:
    """Retries for a bounded time around every call the mount makes."""

    def __init__(self, retry_for: float) -> None:
        self.retry_for = retry_for
        #: Calls made, by function name (`user.dfs.calls` on the mount's root shows them):
        #: how one proves that `ls -l` costs no round trip per entry.
        self.calls: collections.Counter[str] = collections.Counter()

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        done_if: Code | None = None,
        **kwargs: Any,
    ) -> T:
        """fn(*args, **kwargs), retried on transient failures until retry_for has passed.

        With done_if, a retry that fails with that code after an attempt was lost in transit
        raises MaybeDone instead of the error: the lost attempt most likely did it.
        """
        self.calls[getattr(fn, "__name__", "?")] += 1
        deadline = trio.current_time() + self.retry_for
        delay = 0.05
        lost = False
        while True:
            try:
                return await fn(*args, **kwargs)
            except DfsError as e:
                if lost and done_if is not None and e.code is done_if:
                    raise MaybeDone(str(e)) from None
                if (e.code not in TRANSIENT or isinstance(e, CommittedUnread)
                        or trio.current_time() + delay > deadline):
                    raise
                error: Exception = e
                # Never sent (NotSent) is not lost: a retry's EEXIST is then someone else's.
                lost = lost or (isinstance(e, PeerUnavailable) and not isinstance(e, NotSent))
            except _NETWORK as e:
                if trio.current_time() + delay > deadline:
                    raise DfsError(Code.UNAVAILABLE, f"{type(e).__name__}: {e}") from None
                error = e
                lost = True
            log.info("%s failed (%s); retrying in %.2fs", getattr(fn, "__name__", fn), error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)
