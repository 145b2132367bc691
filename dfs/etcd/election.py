"""Lease-backed leader election in etcd, and the fencing token every leader write compares.

The leader is whoever created the election key: a txn creates it only while it does not
exist (`create_revision == 0`), attached to the candidate's lease, with the candidate's
address as value. The key's create_revision names that leadership for good: once the lease
ends the key is deleted, and a later leader's key has a higher create_revision, so a write
that compares it (dfs/etcd/mirror.py) can never land for a deposed leader, however late.

The leader must keep its lease alive (`Election.keep_alive`, a trio task). It steps down the
moment the lease is found gone, or when the TTL has run out since the last renewal was
*sent* without one succeeding: etcd started counting at or after the send, so the leader
gives up no later than etcd expires the key. A standby polls every POLL_INTERVAL and takes
over within TTL + etcd's expiry check (0.5 s) + a poll: under 5 s with the 2 s default.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.etcd.client import (
    EtcdClient,
    EtcdError,
    LeaseNotFound,
    compare,
    op_put,
    op_range,
)

log = logging.getLogger(__name__)

DEFAULT_TTL = 2  # seconds (etcd grants whole seconds, at least 1.5 s with its default timing)
POLL_INTERVAL = 0.25  # a standby's wait between campaign attempts
RENEWALS_PER_TTL = 4  # keepalives sent per TTL: three may fail before the leader steps down


class LostLeadership(DfsError):
    """This process is no longer (or cannot prove it still is) the leader: step down now."""

    def __init__(self, msg: str = "this coordinator is no longer the leader") -> None:
        super().__init__(Code.UNAVAILABLE, msg)


@dataclass
class Leadership:
    """One term of leadership: the fencing token is the election key's create_revision."""

    key: bytes
    lease_id: int
    create_revision: int
    address: str
    ttl: int
    renewed_at: float  # time.monotonic() when the last successful renewal was sent
    lost: bool = False

    @property
    def expires_at(self) -> float:
        """The monotonic time by which this leader must have stepped down without renewal."""
        return self.renewed_at + self.ttl

    def check(self) -> None:
        """Raise LostLeadership unless this term is still believed valid (a cheap local test;
        the authoritative one is the fencing compare in etcd)."""
        if self.lost:
            raise LostLeadership()
        if time.monotonic() >= self.expires_at:
            self.lost = True
            raise LostLeadership("this coordinator's etcd lease ran out without renewal")


class Election:
    """Candidates for one election key (e.g. b"/dfs/leader")."""

    def __init__(self, client: EtcdClient, key: bytes, *, ttl: int = DEFAULT_TTL) -> None:
        if ttl < 1:
            raise DfsError(Code.BAD_REQUEST, "the leader lease TTL must be at least 1 s")
        self.client = client
        self.key = key
        self.ttl = ttl

    # -- synchronous steps (worker threads) ---------------------------------------------------

    def try_acquire(self, address: str, lease: int) -> int | None:
        """One attempt with an existing lease: the create_revision when we now lead, else None.

        A retried attempt whose first try landed sees the key under our own lease: still ours.
        """
        result = self.client.txn([compare(self.key, "CREATE", "EQUAL", 0)],
                                 [op_put(self.key, address.encode(), lease)],
                                 [op_range(self.key)])
        if result.succeeded:
            return result.revision
        kvs = result.responses[0].get("response_range", {}).get("kvs", []) if result.responses \
            else []
        if kvs and int(kvs[0].get("lease", 0)) == lease:
            return int(kvs[0]["create_revision"])
        return None

    def leader_now(self) -> str | None:
        """The current leader's address, or None while there is none (synchronous)."""
        kv = self.client.get(self.key)
        return kv.value.decode() if kv is not None else None

    # -- trio ---------------------------------------------------------------------------------

    async def campaign(self, address: str) -> Leadership:
        """Wait until this candidate leads; its Leadership. Run `keep_alive` on it at once.

        etcd errors while waiting are logged and retried (a standby outlives an etcd outage);
        cancel the caller to give up.
        """
        lease = 0
        while True:
            try:
                sent = time.monotonic()
                if lease:
                    await runtime.in_thread(self.client.lease_keepalive, lease)
                else:
                    lease, granted = await runtime.in_thread(self.client.lease_grant, self.ttl)
                    self.ttl = max(self.ttl, granted)
                revision = await runtime.in_thread(self.try_acquire, address, lease)
                if revision is not None:
                    log.info("leading as %s (lease %x, term %d)", address, lease, revision)
                    return Leadership(self.key, lease, revision, address, self.ttl, sent)
            except LeaseNotFound:
                lease = 0  # expired while we waited (a long etcd stall): take a new one
            except EtcdError as e:
                log.warning("campaign for %s: %s", self.key.decode(errors="replace"), e.msg)
            await trio.sleep(POLL_INTERVAL)

    async def keep_alive(self, leadership: Leadership, *,
                         task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Renew the lease until it cannot be: then mark the leadership lost and raise
        LostLeadership (run it in the leader's nursery: the raise cancels the leader's work)."""
        interval = leadership.ttl / RENEWALS_PER_TTL
        task_status.started()
        try:
            while True:
                # Wake by the expiry at the latest: a leader whose renewals fail must stop
                # (and stop serving reads) before etcd can hand the key to another.
                await trio.sleep(max(0.0, min(interval,
                                              leadership.expires_at - time.monotonic())))
                left = leadership.expires_at - time.monotonic()
                if left <= 0 or leadership.lost:
                    raise LostLeadership("this coordinator's etcd lease ran out without renewal")
                sent = time.monotonic()
                try:
                    ttl = await runtime.in_thread(functools.partial(
                        self.client.lease_keepalive, leadership.lease_id,
                        timeout=max(0.05, left)))
                except LeaseNotFound:
                    raise LostLeadership("this coordinator's etcd lease has expired") from None
                except EtcdError as e:
                    log.warning("leader lease keepalive failed: %s", e.msg)
                    continue
                if ttl < leadership.ttl:  # granted less than we count on: count with that
                    leadership.ttl = max(1, math.floor(ttl))
                leadership.renewed_at = sent
        except BaseException:
            leadership.lost = True
            raise

    async def current_leader(self) -> str | None:
        """The current leader's address, or None while there is none."""
        return await runtime.in_thread(self.leader_now)

    async def resign(self, leadership: Leadership) -> None:
        """Step down on purpose: revoking the lease deletes the key, so a standby takes over
        at once instead of after the TTL."""
        leadership.lost = True
        try:
            await runtime.in_thread(self.client.lease_revoke, leadership.lease_id)
        except EtcdError as e:  # the lease runs out by itself
            log.warning("resign: %s", e.msg)
