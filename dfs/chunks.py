"""Chunking and checksums shared by writers, nodes and readers (docs/design.md §3)."""

from __future__ import annotations

import xxhash

CHUNK_SIZE = 1024 * 1024


def chunk_digest(data: bytes) -> bytes:
    """xxh3_64 of one chunk, 8 bytes canonical big-endian (as stored before the chunk)."""
    return xxhash.xxh3_64_digest(data)


def nchunks(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


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
