"""A standby coordinator's face to the network: it refuses every request with NOT_LEADER.

A coordinator that does not lead (the election is in dfs/etcd/) must not act on any request,
read or write: its view may be stale and only the leader decides. So `Standby` answers every
op with NOT_LEADER and the leader's address from `leader()` (None while an election runs), and
clients re-aim there (dfs/client/leader.py). The one exception is `coordinator_info`, the
role report `dfs status` shows per coordinator; the leader's CoordinatorService answers it too.

It speaks the same authenticated handshake as the leader; until this standby has learned the
cluster id (`cluster()` None), it offers "" in the handshake, which clients accept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from dfs import rpc
from dfs.errors import Code, DfsError, not_leader
from dfs.rpc import Request, join_address

INFO_OP = "coordinator_info"


def info_reply(role: str, address: str | None, leader: str | None,
               cluster: str | None) -> dict[str, Any]:
    """The `coordinator_info` reply, one shape for leader and standby (docs/protocol.md)."""
    return {"role": role, "address": address, "leader": leader, "cluster": cluster or None}


class Standby(rpc.Service):
    """Serve with `dfs.rpc.serve(standby, host, port, secret, standby.cluster_id)`, or
    `await nursery.start(standby.run, host, port, secret)`."""

    def __init__(self, leader: Callable[[], str | None],
                 cluster: Callable[[], str | None] = lambda: None) -> None:
        self.leader = leader
        self.cluster = cluster
        self.address: str | None = None  # set by run() once bound
        self.refused = 0  # requests answered NOT_LEADER (status, tests)

    def cluster_id(self) -> str:
        """For the handshake: the cluster id, or "" while unknown."""
        return self.cluster() or ""

    async def dispatch(self, req: Request) -> dict[str, Any] | None:
        if not isinstance(req.op, str):
            raise DfsError(Code.BAD_REQUEST, "missing or malformed op")
        if req.op == INFO_OP:
            return info_reply("standby", self.address, self.leader(), self.cluster())
        self.refused += 1
        raise not_leader(self.leader())

    async def run(self, host: str, port: int, secret: bytes, *,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; task_status.started() gets "HOST:PORT" actually bound."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(rpc.serve, self, host, port, secret, self.cluster_id)
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            self.address = join_address(bound_host, bound_port)
            task_status.started(self.address)
