"""The simulated processes' disks: what a crash keeps, a disk that fills up, bytes that rot.

The simulator hands every `Database` of a simulated process an environment of the LMDB model
(dfs/sim/lmdb_model.py) through `db.install_environments`; this module is the world's view
of those disks: `crash(path)` keeps only what was forced, `fill(path, until)` makes commits
fail as a full disk does, `rot(path, rng)` flips one byte of a committed chunk at rest.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgpack

from storage_node.layout import DIGEST_LEN, parse_blob_key, parse_chunk_key


class SimDisks:
    root = Path("/sim")

    def __init__(self, model: object) -> None:
        self.model = model
        self.rotted: set[tuple[int, int]] = set()  # (node id, blob) the world flipped a byte of

    def crash(self, path: Path) -> None:
        self.model.crash(path)  # type: ignore[attr-defined]

    def fill(self, path: Path, until: float) -> None:
        self.model.fill(path, until)  # type: ignore[attr-defined]

    def rot(self, path: Path, rng: random.Random) -> tuple[int, int] | None:
        """Flip a byte of one committed chunk (data, not its digest), durably, as bit rot."""
        committed = []
        for key, value in self.model.items(path, "blobs"):  # type: ignore[attr-defined]
            record = msgpack.unpackb(value, raw=False)
            if record.get("state") == "COMMITTED" and record.get("size"):
                committed.append(parse_blob_key(key))
        if not committed:
            return None
        blob = rng.choice(sorted(committed))
        chunks = [key for key, _ in self.model.items(path, "chunks")  # type: ignore[attr-defined]
                  if parse_chunk_key(key)[0] == blob]
        if not chunks:
            return None
        key = rng.choice(chunks)
        value = bytearray(self.model.get(path, "chunks", key))  # type: ignore[attr-defined]
        if len(value) <= DIGEST_LEN:
            return None
        at = rng.randrange(DIGEST_LEN, len(value))
        value[at] ^= 1 << rng.randrange(8)
        self.model.poke(path, "chunks", key, bytes(value))  # type: ignore[attr-defined]
        return blob, parse_chunk_key(key)[1]
