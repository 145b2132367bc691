"""Operator actions the nemesis takes while other faults run: `dfs node drain ID` and
`dfs node remove ID` (docs/checker.md, the life of a node).

Each is recorded twice: as a fault (it is one more thing going on) and as an `admin` op in the
history (invoke, then ok when the command exited 0, fail when it exited 1, info when it timed
out), so the summary shows how often they worked under faults. Neither is judged by its exit
code: under faults a drain may not finish in time, and the coordinator keeps trying.

R=3 live, placement-eligible nodes are kept at all times: a drain is only started while at
least R+1 members are not draining, and a removal first starts a fresh node to take the
removed one's place. Once the coordinator reports a node removed, the node is killed and its
data directory deleted: its copies are gone for good, and only the other replicas can restore
them. One membership change at a time.
"""

from __future__ import annotations

import random

import trio

from dfs.nemesis.cluster import NemesisCluster
from dfs.nemesis.history import FAIL, INFO, OK, History

ADMIN_TIMEOUT = 90.0  # a drain or remove waiting for re-replication under faults
STATE_TIMEOUT = 30.0  # asking the coordinator what state a node is in (it may be down)


class Membership:
    def __init__(self, cluster: NemesisCluster, history: History, rng: random.Random) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = rng
        self.active = False  # one membership change at a time

    def eligible(self) -> list[str]:
        return [n for n in self.cluster.nodes if n not in self.cluster.draining]

    def drain_targets(self) -> list[str]:
        if self.active or len(self.eligible()) < self.cluster.replicas + 1:
            return []
        return self.eligible()

    def remove_targets(self) -> list[str]:
        if self.active or not self.cluster.can_add_node():
            return []
        draining = sorted(self.cluster.draining)
        return draining or self.eligible()  # a drained node is the natural one to remove

    async def node_ids(self) -> dict[str, int]:
        """The nemesis's names to the coordinator's ids (with retries: it may be down)."""
        with trio.move_on_after(STATE_TIMEOUT):
            while True:
                try:
                    async with self.cluster.client(via="") as client:
                        nodes = await client.node_list()
                    return {name: i for i, name in self.cluster.names_by_id(nodes).items()}
                except Exception:  # noqa: BLE001 - the coordinator may be restarting
                    await trio.sleep(0.5)
        return {}

    async def state_of(self, node_id: int) -> str | None:
        with trio.move_on_after(STATE_TIMEOUT):
            while True:
                try:
                    async with self.cluster.client(via="") as client:
                        nodes = await client.node_list()
                    return next((n["state"] for n in nodes if n["id"] == node_id), None)
                except Exception:  # noqa: BLE001 - the coordinator may be restarting
                    await trio.sleep(0.5)
        return None

    async def _admin(self, verb: str, target: str, node_id: int) -> str:
        op = self.history.invoke("nemesis", verb, "*", "admin", detail=f"{target} id {node_id}")
        try:
            result = await self.cluster.dfs("node", verb, str(node_id), "--json",
                                            timeout=ADMIN_TIMEOUT)
        except trio.TooSlowError:
            self.history.complete(op, INFO, error=f"timeout after {ADMIN_TIMEOUT:g} s")
            return INFO
        outcome = OK if result.returncode == 0 else FAIL
        self.history.complete(op, outcome, error=None if outcome == OK else
                              result.stderr.decode(errors="replace").strip()[-300:])
        return outcome

    async def drain(self, target: str) -> str:
        self.active = True
        try:
            node_id = (await self.node_ids()).get(target)
            if node_id is None:
                return "skipped (no node id)"
            outcome = await self._admin("drain", target, node_id)
            if await self.state_of(node_id) == "draining":
                self.cluster.draining.add(target)
            return outcome
        finally:
            self.active = False

    async def remove(self, target: str) -> str:
        """A fresh node first, then `dfs node remove`; once the coordinator says removed, the
        node's process and data are destroyed (while its replicas are still being re-made)."""
        self.active = True
        try:
            node_id = (await self.node_ids()).get(target)
            if node_id is None:
                return "skipped (no node id)"
            fresh = await self.cluster.add_node()
            self.history.note("node added", node=fresh, replacing=target)
            outcome = INFO
            finished = trio.Event()
            async with trio.open_nursery() as nursery:
                async def run() -> None:
                    nonlocal outcome
                    try:
                        outcome = await self._admin("remove", target, node_id)
                    finally:
                        finished.set()

                nursery.start_soon(run)
                state = await self.state_of(node_id)
                while state != "removed" and not finished.is_set():
                    await trio.sleep(0.3)
                    state = await self.state_of(node_id)
                if state != "removed":
                    state = await self.state_of(node_id)
                if state == "removed":
                    await self.cluster.forget_node(target)
                    self.history.note("node destroyed", node=target, id=node_id)
            return outcome if state == "removed" else f"{outcome}, not removed ({state})"
        finally:
            self.active = False
