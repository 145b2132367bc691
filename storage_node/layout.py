"""The node store's on-disk layout (docs/design.md §3), shared by the store and offline tools.

- `blobs`:  blob id (u64 BE) -> msgpack {"state", "size", "checksum", "nchunks", "created"}
- `chunks`: blob id (u64 BE) + chunk index (u32 BE) -> xxh3_64 digest (8 bytes) + chunk bytes
- `meta`:   b"node_id" (u64 BE), b"cluster" (utf-8), b"format" (u32 BE, FORMAT_VERSION)

Operators' tools and tests rely on this layout: change it only with a FORMAT_VERSION bump
and a migration.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from dfs.chunks import CHECKSUM_LEN, DIGEST_LEN  # noqa: F401 - the layout's, named once
from dfs.db import Database
from dfs.errors import Code, DfsError
from storage_node.participant import BlobState, Shape  # what the participant rules over

log = logging.getLogger(__name__)

SUBDBS = ["blobs", "chunks", "meta"]
COMPACT_DIR = "compact.tmp"  # an online compaction's copy, beside data.mdb (compaction.py)
FORMAT_VERSION = 1
MAX_BLOB_ID = 2**64 - 1
MAX_INDEX = 2**32 - 1

_BLOB = struct.Struct(">Q")
_CHUNK = struct.Struct(">QI")
_U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
META_NODE_ID = b"node_id"
META_CLUSTER = b"cluster"
META_FORMAT = b"format"
META_TOKEN = b"token"  # random, made at creation: registration is idempotent by it


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One `blobs` record; size/checksum/nchunks are None until the blob is prepared."""

    blob: int
    state: BlobState
    size: int | None
    checksum: bytes | None
    nchunks: int | None
    created: float

    @property
    def shape(self) -> Shape | None:
        """The content it holds once prepared (size, checksum, nchunks), else None."""
        if self.size is None or self.checksum is None or self.nchunks is None:
            return None
        return (self.size, self.checksum, self.nchunks)

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "size": self.size,
            "checksum": self.checksum,
            "nchunks": self.nchunks,
            "created": self.created,
        }


def blob_key(blob: int) -> bytes:
    return _BLOB.pack(blob)


def chunk_key(blob: int, index: int) -> bytes:
    return _CHUNK.pack(blob, index)


def parse_blob_key(key: bytes | memoryview) -> int:
    return _BLOB.unpack(key)[0]


def parse_chunk_key(key: bytes | memoryview) -> tuple[int, int]:
    """(blob id, chunk index) of a `chunks` key."""
    return _CHUNK.unpack(key)


def pack_info(info: BlobInfo) -> bytes:
    return msgpack.packb(info.to_wire(), use_bin_type=True)


def unpack_info(blob: int, raw: bytes) -> BlobInfo:
    rec = msgpack.unpackb(raw, raw=False)
    return BlobInfo(
        blob=blob,
        state=BlobState(rec["state"]),
        size=rec.get("size"),
        checksum=rec.get("checksum"),
        nchunks=rec.get("nchunks"),
        created=float(rec.get("created") or 0.0),
    )


def check_blob_id(blob: int) -> None:
    if not 0 <= blob <= MAX_BLOB_ID:
        raise DfsError(Code.EINVAL, f"blob id {blob} out of range")


def check_format(db: Database, readonly: bool) -> None:
    """Refuse a data dir that holds another process's environment or a newer format."""
    with db.env.begin() as txn:
        names = {bytes(k).decode("utf-8", "replace") for k, _ in txn.cursor().iternext()}
        raw = txn.get(META_FORMAT, db=db["meta"])
    foreign = names - set(SUBDBS)
    if foreign:
        raise DfsError(
            Code.EINVAL, f"{db.path} is not a node data dir (holds {', '.join(sorted(foreign))})"
        )
    if raw is not None:
        version = _U32.unpack(raw)[0]
        if version != FORMAT_VERSION:
            raise DfsError(
                Code.EINVAL, f"{db.path}: node store format {version}, want {FORMAT_VERSION}"
            )
    elif not readonly:
        db.write_now(lambda txn: txn.put(META_FORMAT, _U32.pack(FORMAT_VERSION), db=db["meta"]))
    if not readonly:
        with db.env.begin() as txn:
            has_token = txn.get(META_TOKEN, db=db["meta"]) is not None
        if not has_token:
            token = os.urandom(16)
            db.write_now(lambda txn: txn.put(META_TOKEN, token, db=db["meta"]))


def remove_compaction_leftover(path: Path) -> None:
    """A crash mid-compaction leaves its copy behind: data.mdb is complete without it (the
    copy replaces it only by an atomic rename once forced; storage_node/compaction.py)."""
    leftover = Path(path) / COMPACT_DIR
    if leftover.exists():
        log.warning("removing the copy of an unfinished compaction (%s)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
