"""`dfs coordinator --meta etcd://...`: a standby until elected, the leader until its lease goes.

docs/operations.md, "Standby coordinators". One process, two roles on one address:
- Standby: serves `dfs.coordinator.standby.Standby` (every request answered NOT_LEADER with
  the leader's address, which it polls from etcd) and campaigns (dfs/etcd/election.py).
- Warm cache: from the moment a term as standby begins, the LMDB cache is loaded from etcd
  and kept in step with it by a watch (dfs/etcd/follower.py), so that a takeover needs only
  the changes up to its own election, not a load of the whole namespace.
- Leader: its LMDB cache caught up (or, if that fails, emptied and loaded from etcd:
  dfs/etcd/mirror.py), then the very coordinator of the LMDB-only case runs over it:
  start-up recovery resumes COMMIT delivery for every decided transaction and presumes
  abort for the rest, as after a restart. Every
  batch it writes is one fenced etcd transaction. The lease kept alive is the leadership: the
  moment a keepalive finds it gone, or a fenced write is refused, the service is cancelled
  and the process is a standby again (with a fresh cache at its next term).
Error policy: the top nursery ends on SIGINT/SIGTERM; a lost leadership ends only the leader
nursery; the follower retries etcd failures itself; anything else is a bug and ends the
process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from pathlib import Path
from typing import Any

import trio

from dfs import runtime, sdnotify
from dfs.errors import DfsError
from dfs.etcd import leader_key, meta_prefix
from dfs.etcd.client import Compacted, EtcdClient, EtcdError
from dfs.etcd.election import Election, Leadership, LostLeadership
from dfs.etcd.follower import Follower
from dfs.etcd.mirror import EtcdMirror, subdb_prefix
from dfs.failpoints import failpoint
from dfs.meta import MetaStore
from dfs.meta.cluster import CLUSTER_ID
from dfs.meta.codec import unpack
from dfs.meta.store import SUBDBS
from dfs.metrics.http import start_metrics

from .config import CoordinatorConfig
from .service import CoordinatorService, coordinator_metrics
from .standby import Standby

log = logging.getLogger("dfs.coordinator")

PREFIX = "/dfs"  # every key dfs keeps in etcd is under it
LEADER_KEY = leader_key(PREFIX)
META_PREFIX = meta_prefix(PREFIX)  # the sub-databases, as dfs/etcd/mirror.py lays them out
MIGRATING = f"{PREFIX}/migrating".encode()  # `dfs meta migrate` has not finished (cli/meta.py)
MIGRATION_WAIT = 5.0  # a leader that finds an unfinished migration looks again after this
LEADER_POLL = 0.25  # a standby refreshes the leader it names this often
DEPOSED_POLL = 0.05  # a leader checks that its fenced writes still land this often
COMPACT_EVERY = 300.0  # the leader compacts etcd's history this often...
COMPACT_KEEP = 10_000  # ...keeping this many revisions (reads of a load span a few)
QUOTA_WARN = 0.8  # `dfs status` warns once etcd's backend is this full (writes stop at 1.0)
# An elected standby whose loaded cache applies nothing for this long before it has caught
# up with its own election loads the cache afresh instead (a watch stuck on a partitioned
# member, say; a silent watch is begun again after WATCH_IDLE, 2 s).
CATCH_UP_STALL = 3.0


class HaCoordinator:
    """The two roles of one coordinator process over one etcd cluster."""

    def __init__(self, config: CoordinatorConfig, secret: bytes, client: EtcdClient) -> None:
        self.config = config
        self.secret = secret
        self.client = client
        self.election = Election(client, LEADER_KEY, ttl=config.leader_ttl)
        self.leader: str | None = None  # as last read from etcd (standby role)
        self.cluster_id = ""
        self.role = "standby"
        self.terms = 0
        self._announced = False
        self.metrics = coordinator_metrics()  # the process's: counters go on across terms

    # ------------------------------------------------------------ the whole process

    async def run(self) -> int:
        await runtime.in_thread(self.client.status)  # an unreachable etcd: a clear start error
        EtcdMirror.refuse_non_cache(Path(self.config.data))  # so is real metadata in --data
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            self.metrics.address = await start_metrics(
                nursery, self.metrics.registry, self.config.metrics, "coordinator")
            while True:
                async with trio.open_nursery() as term:
                    follower = Follower(self.client, PREFIX, META_PREFIX, self.config.data,
                                        SUBDBS)
                    term.start_soon(follower.run)
                    leadership = await self._stand_by()
                    await self._lead(leadership, follower)
                    term.cancel_scope.cancel()
                await trio.sleep(LEADER_POLL)  # let the next leader's key appear first
        return 0

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    def _announce(self, address: str) -> None:
        """The first bind: the address is fixed for good (a port 0 becomes the one picked)."""
        if self._announced:
            return
        self._announced = True
        self.config = dataclasses.replace(self.config, listen=address)
        print(f"dfs coordinator listening on {address}", flush=True)
        sdnotify.ready(f"listening on {address}")

    # ------------------------------------------------------------ standby

    async def _stand_by(self) -> Leadership:
        self.role = "standby"
        host, port = self.config.host_port
        standby = Standby(lambda: self.leader, lambda: self.cluster_id or None)
        standby.rpc_metrics = self.metrics.rpc
        async with trio.open_nursery() as nursery:
            address = await nursery.start(standby.run, host, port, self.secret)
            self._announce(address)
            nursery.start_soon(self._follow)
            log.info("standby on %s; campaigning", address)
            leadership = await self.election.campaign(self.config.listen)
            nursery.cancel_scope.cancel()
        return leadership

    async def _follow(self) -> None:
        """Keep `leader` and the cluster id fresh for the NOT_LEADER replies."""
        while True:
            try:
                self.leader = await self.election.current_leader()
                if not self.cluster_id:
                    self.cluster_id = await runtime.in_thread(self._stored_cluster_id)
            except EtcdError as e:
                log.debug("leader poll: %s", e.msg)
                self.leader = None
            await trio.sleep(LEADER_POLL)

    def _stored_cluster_id(self) -> str:
        kv = self.client.get(subdb_prefix(META_PREFIX, "meta") + CLUSTER_ID)
        value = unpack(kv.value) if kv is not None else ""
        return value if isinstance(value, str) else ""

    # ------------------------------------------------------------ leader

    async def _lead(self, leadership: Leadership, follower: Follower) -> None:
        self.role = "leader"
        self.terms += 1
        mirror = EtcdMirror(self.client, META_PREFIX, leadership)
        store: MetaStore | None = None
        try:
            async with trio.open_nursery() as nursery:
                # The lease is kept alive from the first moment: loading the cache of a
                # namespace of 10^5 files takes several lease TTLs (without renewals the lease
                # ran out during every load and the leader stood by again, forever).
                nursery.start_soon(self.election.keep_alive, leadership)
                store = await self._take_over(leadership, mirror, follower)
                if store is None:
                    nursery.cancel_scope.cancel()
                    return
                self.cluster_id = store.cluster_id
                self.leader = self.config.listen
                log.info("leading (term %d, etcd revision %d): cluster %s", self.terms,
                         leadership.create_revision, store.cluster_id)
                service = CoordinatorService(store, self.config, self.secret, self.metrics)
                service.ha = self  # type: ignore[attr-defined]  # op_status reports the roles
                nursery.start_soon(self._watch_fence, mirror)
                nursery.start_soon(self._compact)
                await nursery.start(service.run)
        except* LostLeadership as group:
            log.warning("stepping down: %s", group.exceptions[0])
            if mirror.in_doubt:
                # The lease may still be good: revoke it, so that no late copy of the write
                # in doubt can land, and the next leader is elected at once.
                await self.election.resign(leadership)
        except* DfsError as group:
            # The metadata store failed under the leader (etcd unreachable or without a
            # quorum), or could not be loaded: stand by again rather than exit; whoever can
            # reach etcd leads next.
            log.warning("stepping down: the metadata store failed: %s", group.exceptions[0])
            await self.election.resign(leadership)
        finally:
            self.role = "standby"
            self.leader = None
            if store is not None:
                store.close()

    async def _take_over(self, leadership: Leadership, mirror: EtcdMirror,
                         follower: Follower) -> MetaStore | None:
        """The cache, caught up with this election (or emptied and loaded from etcd); None
        (resigned) while etcd holds an unfinished migration."""
        if await runtime.in_thread(self.client.get, MIGRATING) is not None:
            log.error("etcd holds an unfinished `dfs meta migrate`: not leading until it is "
                      "run again to the end")
            await self.election.resign(leadership)
            await trio.sleep(MIGRATION_WAIT)
            return None
        await failpoint("coordinator.takeover")  # tests: a load that outlasts the lease
        follower.renew = mirror.renew_if_due  # a load still running keeps the lease alive
        warm = await follower.caught_up(leadership.create_revision, CATCH_UP_STALL)
        await follower.stop()
        if warm:
            log.info("taking over with the standby's cache (etcd revision %d, %d changes "
                     "followed)", follower.revision, follower.applied)
        else:
            log.info("taking over with a freshly loaded cache")
        follower.close()
        return await runtime.in_thread(functools.partial(
            MetaStore.open, self.config.data, replicas=self.config.replicas,
            gc_grace_ns=int(self.config.gc_grace * 1e9), mirror=mirror,
            keep_versions=self.config.keep_versions, loaded=warm))

    @staticmethod
    async def _watch_fence(mirror: EtcdMirror) -> None:
        """A fenced write refused (another leader's key), or one in doubt: step down now, not
        at the TTL."""
        while not mirror.deposed:
            await trio.sleep(DEPOSED_POLL)
        raise LostLeadership(mirror.deposed_why)

    async def _compact(self) -> None:
        """Compaction is configured, not left to chance: etcd keeps COMPACT_KEEP revisions."""
        while True:
            await trio.sleep(COMPACT_EVERY)
            try:
                now = await runtime.in_thread(functools.partial(
                    self.client.range, LEADER_KEY, count_only=True))
                if now.revision > COMPACT_KEEP:
                    await runtime.in_thread(self.client.compact, now.revision - COMPACT_KEEP)
            except Compacted:
                pass
            except EtcdError as e:
                log.warning("etcd compaction: %s", e.msg)

    # ------------------------------------------------------------ status

    async def describe(self) -> dict[str, Any]:
        """For `dfs status`: the store, each etcd member's health and the quota headroom."""
        return await runtime.in_thread(self._describe)

    def _describe(self) -> dict[str, Any]:
        members = []
        largest = 0
        for endpoint in self.client.endpoints:
            try:
                st = self.client.status(endpoint)
            except EtcdError as e:
                members.append({"endpoint": endpoint, "healthy": False, "error": e.msg})
                continue
            largest = max(largest, st.db_size)
            members.append({"endpoint": endpoint, "healthy": True, "leader": st.leader == st.member_id,
                            "db_size": st.db_size, "version": st.version})
        try:
            alarms = [kind for _, kind in self.client.alarms()]
        except EtcdError as e:
            alarms = [f"unknown: {e.msg}"]
        quota = self.config.etcd_quota
        used = largest / quota if quota else 0.0
        return {"store": "etcd", "leader": self.config.listen, "members": members,
                "alarms": alarms, "db_size": largest, "quota": quota,
                "quota_used": round(used, 4), "quota_warning": used >= QUOTA_WARN}
