"""Chunking and checksums shared by writers, nodes and readers (docs/design.md §3)."""

from __future__ import annotations

import xxhash

CHUNK_SIZE = 1024 * 1024
CHECKSUM_LEN = 16  # a version's checksum: xxh3_128 of its bytes
DIGEST_LEN = 8  # a chunk's digest: xxh3_64, stored before the chunk


def chunk_digest(data: bytes) -> bytes:
    """xxh3_64 of one chunk, 8 bytes canonical big-endian (as stored before the chunk)."""
    return xxhash.xxh3_64_digest(data)


def nchunks(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_length(size: int, index: int) -> int:
    """The bytes chunk `index` of a `size`-byte version holds (the last may be short; one
    past the end holds none)."""
    return max(0, min(CHUNK_SIZE, size - index * CHUNK_SIZE))


def chunk_problem(data: object, digest: object, want: int) -> str | None:
    """Why `data` is not a chunk of `want` bytes matching `digest`, or None: the one check
    every reader of a chunk (node, peer, client) makes before it uses the bytes."""
    if not isinstance(data, (bytes, memoryview)) or len(data) != want:
        got = len(data) if isinstance(data, (bytes, memoryview)) else "no"
        return f"has {got} bytes, want {want}"
    if chunk_digest(data) != digest:
        return "fails its digest"
    return None


def shape_problem(size: int, checksum: object, count: int) -> str | None:
    """Why (size, checksum, nchunks) cannot describe a version's bytes, or None: one rule for
    the coordinator's commit, a group's members and a node's PREPARE."""
    if not isinstance(checksum, bytes) or len(checksum) != CHECKSUM_LEN:
        return f"checksum must be {CHECKSUM_LEN} bytes (xxh3_128)"
    if count != nchunks(size):
        return f"{size} bytes are {nchunks(size)} chunks, not {count}"
    return None


class FileHasher:
    """Incremental xxh3_128 of a whole file's bytes."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> bytes:
        return self._h.digest()


def file_checksum(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)
