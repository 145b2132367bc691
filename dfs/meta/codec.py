"""Key and value encodings of the coordinator's LMDB (docs/design.md §3).

Integer keys are big-endian so LMDB's byte order is numeric order and range scans (readdir by
cookie, the GC queue by time, txids) are plain cursor walks. Values are msgpack maps, so a field
can be added without a format bump.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

U64 = struct.Struct(">Q")
U64x2 = struct.Struct(">QQ")
U64x3 = struct.Struct(">QQQ")


def k64(n: int) -> bytes:
    """An unsigned 64-bit key, big-endian."""
    return U64.pack(n)


def unk64(key: bytes) -> int:
    return U64.unpack_from(key)[0]


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # Maps keyed by bytes (xattrs) need strict_map_key=False.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def held_by(txn: Any, db: Any, blob: int) -> Iterator[tuple[int, int]]:
    """The (a, b) of every key blob + a + b in an index keyed by blob first (`retained`,
    `snapheld`: who holds a blob), in key order."""
    with txn.cursor(db=db) as cur:
        if not cur.set_range(k64(blob)):
            return
        for key in cur.iternext(keys=True, values=False):
            held, a, b = U64x3.unpack(key)
            if held != blob:
                return
            yield a, b
