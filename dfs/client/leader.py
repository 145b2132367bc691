"""The link to whichever of several coordinators leads (docs/client.md, "Following the leader").

Clients, mounts and storage nodes are given a list of coordinators; exactly one leads, the
others are standbys that refuse every request with NOT_LEADER, naming the leader when they know
it. `LeaderLink.call` has the signature and retry rule of `Peer.call` (retry_for > 0: the request
is idempotent) and adds the following rules, which only ever resend a request that cannot have
been executed:

- NOT_LEADER naming a leader: switch to it (learning the address if it is new) and resend at
  once; NOT_LEADER naming none (an election runs): the next address, after a short backoff.
  A standby executed nothing, so this holds for every request, for up to `failover_for`.
- a connection that could not be opened (`NotSent`: the request never went out): the next
  address at once; when every address failed in a row, the call fails as before (or, with
  retry_for, backs off and goes round again; so it does for up to failover_for once a standby
  answered in this call: a leader it named may be on its way up or down).
- a request that went out and got no reply (`PeerUnavailable`): the next call starts at the
  next address; the request itself is resent only when idempotent (retry_for), as before.
An UNAVAILABLE reply is the leader speaking: retried in place when idempotent, else raised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from dfs.errors import Code, DfsError, leader_of
from dfs.rpc import Backoff, NotSent, Peer, PeerUnavailable, parse_address

log = logging.getLogger(__name__)

#: How long a request refused by NOT_LEADER, or never sent, is re-aimed while the cluster
#: finds its leader (standbys take over within 5 s of the leader's death).
FAILOVER_FOR = 10.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
#: Addresses a link remembers from NOT_LEADER replies beyond those it was given (a bound on
#: what a confused standby can make it remember); past it the oldest learned one is forgotten.
MAX_LEARNED = 8


def split_addresses(coordinators: str | Sequence[str]) -> list[str]:
    """"A,B,C" or a list of HOST:PORT, validated, duplicates dropped, order kept."""
    items = coordinators.split(",") if isinstance(coordinators, str) else list(coordinators)
    out: list[str] = []
    for item in items:
        address = item.strip()
        if address and address not in out:
            parse_address(address)
            out.append(address)
    if not out:
        raise DfsError(Code.EINVAL, "no coordinator address given")
    return out


class LeaderLink:
    """Calls to the leading coordinator among `coordinators`, following it as it moves."""

    def __init__(
        self,
        coordinators: str | Sequence[str],
        secret: bytes,
        *,
        timeout: float = 10.0,
        expect_cluster: str | None = None,
        failover_for: float = FAILOVER_FOR,
    ) -> None:
        self.addresses = split_addresses(coordinators)
        self._given = len(self.addresses)  # the first ones were given; the rest were learned
        self.secret = secret
        self.timeout = timeout
        self.failover_for = failover_for
        self._expect_cluster = expect_cluster
        self._peers: dict[str, Peer] = {}
        self._current = self.addresses[0]
        self.switches = 0  # times the link moved to another address (tests and logs)

    @property
    def address(self) -> str:
        """The coordinator currently used (the leader, as far as this link knows)."""
        return self._current

    @property
    def expect_cluster(self) -> str | None:
        return self._expect_cluster

    @expect_cluster.setter
    def expect_cluster(self, cluster: str | None) -> None:
        """Once learned (a node's registration), every coordinator must be of this cluster."""
        self._expect_cluster = cluster
        for peer in self._peers.values():
            peer.expect_cluster = cluster

    def peer(self, address: str) -> Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(
                address, self.secret, expect_cluster=self._expect_cluster, timeout=self.timeout)
        return peer

    async def aclose(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            await peer.aclose()

    # ------------------------------------------------------------ aiming

    def _move(self, address: str) -> None:
        if address != self._current:
            log.info("coordinator %s -> %s", self._current, address)
            self._current = address
            self.switches += 1

    def _follow(self, leader: str) -> bool:
        """Aim at the leader a standby named; False if it is no usable address."""
        if leader not in self.addresses:
            try:
                parse_address(leader)
            except DfsError:
                return False
            learned = self.addresses[self._given:]
            if len(learned) >= MAX_LEARNED:
                stale = next((a for a in learned if a != self._current), None)
                if stale is None:
                    return False
                self.addresses.remove(stale)
            self.addresses.append(leader)
        self._move(leader)
        return True

    def _next(self, after: str) -> None:
        """Aim at the address after `after` (unless another call already moved on)."""
        if self._current == after:
            index = self.addresses.index(after) if after in self.addresses else -1
            self._move(self.addresses[(index + 1) % len(self.addresses)])

    # ------------------------------------------------------------ calls

    async def call(
        self,
        op: str,
        *,
        timeout: float | None = None,
        retry_for: float = 0.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one request to the leader; raise DfsError for an error reply (see the module
        doc for what is resent). NOT_LEADER never escapes: past failover_for it is
        UNAVAILABLE (nothing was executed)."""
        start = trio.current_time()
        retry_until = start + retry_for
        follow_until = start + max(retry_for, self.failover_for)
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        unreached = 0  # addresses in a row whose connection could not be opened
        redirects = 0  # NOT_LEADER hops since the last pause (a loop of stale standbys)
        standby_seen = False  # the cluster answers: a leader is coming, unreached ones wait
        while True:
            address = self._current
            try:
                return await self.peer(address).call(op, timeout=timeout or self.timeout,
                                                     **fields)
            except NotSent as e:
                self._next(address)
                unreached += 1
                if unreached < len(self.addresses):
                    continue
                error: DfsError = e
                until = follow_until if standby_seen else retry_until
            except PeerUnavailable as e:
                self._next(address)  # it may have died: the next call looks elsewhere first
                if retry_for <= 0:
                    raise
                error, until = e, retry_until
            except DfsError as e:
                if e.code is Code.NOT_LEADER:
                    leader = leader_of(e)
                    redirects += 1
                    standby_seen = True
                    if (leader and leader != address and redirects <= len(self.addresses)
                            and self._follow(leader)):
                        unreached = 0
                        continue
                    self._next(address)
                    error = DfsError(Code.UNAVAILABLE, f"no coordinator of "
                                     f"{','.join(self.addresses)} leads: {e.msg}")
                    until = follow_until
                elif e.code is Code.UNAVAILABLE and retry_for > 0:
                    error, until = e, retry_until
                else:
                    raise
            if not await backoff.wait(until):
                raise error
            unreached = redirects = 0
