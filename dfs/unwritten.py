"""Leases on files created unwritten (docs/design.md §6, "A new file appears with its
content").

An unwritten file is hidden from every client but its creator, yet its name is taken: while
its creator lives, another exclusive create, mkdir, symlink or link of the name must fail
(O_EXCL lock files). A creator that died (a killed mount) would take the name for good, and
`tar -x`, which creates with O_EXCL and cannot unlink a name it cannot see, would fail on it
forever. So a creator renews its unwritten files (`keep_unwritten`, every quarter lease), and
one whose lease ran out is abandoned: the next create-like request of its name removes it in
the same transaction and goes on.

The renewals live in memory: a coordinator that starts (or takes over) gives every unwritten
file one whole lease from its start, within which live creators renew. Time is trio's clock,
so the simulator's runs the same code.
"""

from __future__ import annotations

import trio

#: Renewed inodes remembered at most; past it the oldest renewal is forgotten (its file is
#: then judged by the coordinator's start, as after a restart).
MAX_LEASES = 65536
#: Default lease of an unwritten file, seconds (`dfs coordinator --unwritten-lease`).
UNWRITTEN_LEASE_S = 60.0
#: Inode numbers one keep_unwritten request renews at most (the client batches by it).
MAX_KEEP = 4096


class UnwrittenLeases:
    def __init__(self, lease_s: float = UNWRITTEN_LEASE_S) -> None:
        self.lease_s = lease_s
        self._since = trio.current_time()
        self._renewed: dict[int, float] = {}

    def renew(self, inos: list[int]) -> None:
        now = trio.current_time()
        for ino in inos:
            self._renewed.pop(ino, None)
            self._renewed[ino] = now  # newest last: the oldest go first past MAX_LEASES
        while len(self._renewed) > MAX_LEASES:
            del self._renewed[next(iter(self._renewed))]

    def forget(self, ino: int) -> None:
        self._renewed.pop(ino, None)

    def abandoned(self, ino: int, now: float) -> bool:
        """Whether nobody renewed the unwritten file `ino` for a whole lease before `now`
        (trio's clock, read on the trio thread: the test may run in the database writer)."""
        last = max(self._since, self._renewed.get(ino, self._since))
        return now - last > self.lease_s
