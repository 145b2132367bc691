"""The simulated processes' disks as the world sees them: a crash keeps only what was forced,
a disk fills up for a while, a byte of a committed chunk rots at rest.

Every `Database` of a simulated process opens an environment of the LMDB model
(dfs/sim/lmdb_model.py) through `db.install_environments`; this is the world's handle on them.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import trio

from dfs.sim.lmdb_model import SimDisks
from storage_node.layout import DIGEST_LEN, parse_blob_key, parse_chunk_key


class WorldDisks:
    root = Path("/sim")

    def __init__(self, world_rng: random.Random) -> None:
        self.model = SimDisks()
        self.rng = world_rng
        self.rotted: set[tuple[int, int]] = set()  # (node id, blob) the world flipped a byte of
        self._full_until: dict[str, float] = {}

    def crash(self, path: Path) -> None:
        """Power cut: a seeded number of the unforced commits survive, the rest are lost."""
        self.model.crash(str(path), self.rng)

    def fill(self, path: Path, until: float) -> None:
        if str(path) not in self.model.disks:
            return
        self._full_until[str(path)] = until
        self.model.set_full(str(path), True)

    def tick(self) -> None:
        """Give room back to disks whose full spell is over."""
        now = trio.current_time()
        for path, until in list(self._full_until.items()):
            if now >= until:
                del self._full_until[path]
                self.model.set_full(path, False)

    def heal(self) -> None:
        for path in list(self._full_until):
            self.model.set_full(path, False)
        self._full_until.clear()

    def rot(self, path: Path, rng: random.Random) -> tuple[int, int] | None:
        """Flip one bit of one committed chunk's data (not its digest) at rest: every stored
        version of that record changes, as a bad sector would. Returns (blob, chunk)."""
        disk = self.model.disks.get(str(path))
        if disk is None or b"blobs" not in disk.stores or b"chunks" not in disk.stores:
            return None
        blobs, chunks = disk.stores[b"blobs"], disk.stores[b"chunks"]
        committed = []
        for key in blobs.keys:
            value = blobs.value_at(key, disk.version)
            if value is not None:
                record = msgpack.unpackb(value, raw=False)
                if record.get("state") == "COMMITTED" and record.get("size"):
                    committed.append(parse_blob_key(key))
        if not committed:
            return None
        blob = rng.choice(committed)
        keys = [k for k in chunks.keys if parse_chunk_key(k)[0] == blob
                and chunks.value_at(k, disk.version) is not None]
        if not keys:
            return None
        key = rng.choice(keys)
        current = chunks.value_at(key, disk.version)
        assert current is not None
        if len(current) <= DIGEST_LEN:
            return None
        at, bit = rng.randrange(DIGEST_LEN, len(current)), 1 << rng.randrange(8)
        history = chunks.history[key]
        for i, (version, value) in enumerate(history):
            if value is not None and len(value) > at:
                flipped = bytearray(value)
                flipped[at] ^= bit
                history[i] = (version, bytes(flipped))
        return blob, parse_chunk_key(key)[1]
