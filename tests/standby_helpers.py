"""Real standby coordinators for tests: `Standby` served over TCP on loopback, naming the leader
the test tells it of (the election itself is dfs/etcd/'s; here the test plays it).

    async with standby(Leader(addr), secret) as s: ...      # in a trio test
    with standby_thread(secret) as s: s.leader.address = addr  # in a plain (threaded) test
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio
from coord_helpers import SECRET

from dfs.coordinator.standby import Standby


class Leader:
    """What a standby believes: the leader's address, or None while an election runs."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def __call__(self) -> str | None:
        return self.address


@asynccontextmanager
async def standby(leader: Leader, secret: bytes = SECRET) -> AsyncIterator[Standby]:
    service = Standby(leader)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run, "127.0.0.1", 0, secret)
        yield service
        nursery.cancel_scope.cancel()


class StandbyThread:
    """A standby on its own trio loop in a thread, for tests that block (mounts, the CLI)."""

    def __init__(self, secret: bytes) -> None:
        self.leader = Leader()
        self.secret = secret
        self.address = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        with trio.CancelScope() as self._scope:
            self._token = trio.lowlevel.current_trio_token()
            async with standby(self.leader, self.secret) as service:
                assert service.address is not None
                self.address = service.address
                self._ready.set()
                await trio.sleep_forever()

    def start(self) -> StandbyThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the standby did not start")
        return self

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)


@contextmanager
def standby_thread(secret: bytes) -> Iterator[StandbyThread]:
    thread = StandbyThread(secret).start()
    try:
        yield thread
    finally:
        thread.stop()
