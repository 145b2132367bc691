"""Names from recent readdir replies, so `ls -l` of a big directory costs no lookup per entry
(docs/mount.md, "Listings").

readdirplus hands the kernel every entry with its attributes, cached for the attribute timeout.
`ls -l` reads the whole directory first and then stats each entry; in a directory of thousands
that takes longer than the timeout, and every entry that expired meanwhile costs one lookup
round trip, which slows the listing further (measured: 3,000 to 9,600 lookups for one `ls -l`
of 5,000 entries). The coordinator's answer is never older here than it would be in the
kernel's cache: a lookup of a name listed less than the timeout ago (with no namespace change
on this mount since) is answered from the listing with what is left of the timeout, and one of
a name listed longer ago re-reads the directory page that held it (REVALIDATE_BATCH entries from
its cookie on) in one round trip, which renews its neighbours too. A name missing from that
page (removed, or renamed) is looked up as before.
"""

from __future__ import annotations

import time
from collections import OrderedDict

#: (directory, name) pairs remembered from readdir replies (oldest forgotten).
NAMES_KEPT = 32_768
#: Entries one revalidating readdir reads, from the cookie of the name being looked up.
REVALIDATE_BATCH = 256
#: Below this attribute timeout a renewed page would expire before its names are used, and a
#: page costs more than a lookup: names are then looked up one by one, as before.
RENEW_MIN_TIMEOUT = 0.2


class Listings:
    """(parent, name) -> (cookie, ino, when listed, the inode table's epoch then)."""

    def __init__(self, timeout: float, kept: int = NAMES_KEPT) -> None:
        self.timeout = timeout
        self.kept = kept
        self._names: OrderedDict[tuple[int, bytes], tuple[int, int, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def listed(self, parent: int, name: bytes, cookie: int, ino: int, epoch: int,
               when: float | None = None) -> None:
        key = (parent, name)
        self._names[key] = (cookie, ino, time.monotonic() if when is None else when, epoch)
        self._names.move_to_end(key)
        while len(self._names) > self.kept:
            self._names.popitem(last=False)

    def fresh(self, parent: int, name: bytes, epoch: int) -> tuple[int, float] | None:
        """(ino, seconds it may still be trusted) if listed recently and nothing changed."""
        found = self._names.get((parent, name))
        if found is None:
            return None
        _, ino, when, then = found
        left = self.timeout - (time.monotonic() - when)
        return (ino, left) if then == epoch and left > 0.05 else None

    def cookie(self, parent: int, name: bytes) -> int | None:
        """Where the name was in its directory when last listed (to re-read that page)."""
        if self.timeout < RENEW_MIN_TIMEOUT:
            return None
        found = self._names.get((parent, name))
        return None if found is None else found[0]

    def forget(self, parent: int, name: bytes) -> None:
        self._names.pop((parent, name), None)
