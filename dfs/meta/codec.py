"""Key and value encodings of the coordinator's LMDB (docs/design.md §3).

Integer keys are big-endian so LMDB's byte order is numeric order and range scans (readdir by
cookie, the GC queue by time, txids) are plain cursor walks. Values are msgpack maps, so a field
can be added without a format bump.
"""

from __future__ import annotations

import struct
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
