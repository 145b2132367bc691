"""Which replicas of a file stay, which are re-made in place, which move: sans-IO.

A repair or a re-replication of one file is planned here from its replica list, the cluster's
R, what the coordinator knows of each node, and which copies are known to be bad;
`new_replica_list` turns the copies that actually succeeded into the new replica list. Pure functions, so every
corner (a removed node, a bad copy on a draining node, too few spare nodes) is unit-tested
without a cluster.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

UP, DRAINING, REMOVED = "up", "draining", "removed"


@dataclass
class CopyPlan:
    replicas: list[int]  # the listed replicas, deduplicated, in order
    keep: list[int] = field(default_factory=list)  # stay listed as they are
    in_place: list[int] = field(default_factory=list)  # bad copies on live up nodes: re-copied
    evacuate: list[int] = field(default_factory=list)  # to be replaced by new nodes
    sources: list[int] = field(default_factory=list)  # live copies believed good, best first
    new: int = 0  # how many new nodes to copy to
    gone: set[int] = field(default_factory=set)  # removed / unknown nodes: never listed again

    @property
    def nothing_to_do(self) -> bool:
        return not self.in_place and not self.evacuate and self.new == 0


def plan_copy(replicas: Collection[int], r: int, states: Mapping[int, str],
              live: Collection[int], bad: Collection[int], *, evacuate_down: bool) -> CopyPlan:
    """Plan the copies that give a file R good replicas.

    `states` maps node id -> its stored state (up, draining, removed; a node missing from it
    counts as removed); `live` are the nodes heard from lately. `bad` are nodes whose copy is
    known bad or missing. With `evacuate_down`, replicas on nodes that are not live are
    replaced too (down too long, or the operator asked for a repair).
    """
    listed = list(dict.fromkeys(replicas))
    plan = CopyPlan(listed)
    bad, live = set(bad), set(live)
    for node in listed:
        state = states.get(node, REMOVED)
        if state == REMOVED:
            plan.evacuate.append(node)
            plan.gone.add(node)
        elif node in bad:
            (plan.in_place if state == UP and node in live else plan.evacuate).append(node)
        elif state == DRAINING or (node not in live and evacuate_down):
            plan.evacuate.append(node)
        else:
            plan.keep.append(node)
    # Which evacuees to keep listed if too few new copies succeed: a draining node (still
    # readable) before a down one, before a bad copy; gone nodes never.
    plan.evacuate.sort(key=lambda n: (n in plan.gone, n in bad, n not in live))
    good = [n for n in listed
            if n not in bad and n in live and states.get(n, REMOVED) in (UP, DRAINING)]
    # Up nodes first: a draining node is being emptied and should serve as little as possible.
    plan.sources = sorted(good, key=lambda n: states[n] != UP)
    plan.new = max(0, r - len(plan.keep) - len(plan.in_place))
    return plan


def verdict_without_source(plan: CopyPlan, live: Collection[int]) -> str:
    """No live good copy to copy from: 'unavailable' if a copy may come back with a node that
    is down, else 'lost' (every replica is bad or on a node that is gone)."""
    waiting = [n for n in plan.replicas
               if n not in plan.gone and n not in plan.in_place and n not in live]
    return "unavailable" if waiting else "lost"


def new_replica_list(plan: CopyPlan, r: int, new_nodes: Collection[int]) -> list[int]:
    """The replica list after the copies: kept and in-place replicas in their old order (an
    in-place copy that failed stays listed: no worse than before), then the new nodes;
    evacuated replicas are dropped only as far as new copies replace them (gone nodes always)."""
    shortfall = max(0, r - len(plan.keep) - len(plan.in_place) - len(new_nodes))
    spare = [n for n in plan.evacuate if n not in plan.gone]
    retained = set(spare[:shortfall])
    listed = [n for n in plan.replicas
              if n in plan.keep or n in plan.in_place or n in retained]
    return listed + [n for n in new_nodes if n not in listed]
