"""`scripts/bench-check --seed N`: millions of files in seconds, for measuring the checker.

Writing 10^6 files through the client takes hours on a small machine; the checker only
reads metadata and node records. So the stopped coordinator's LMDB gets N file inodes in
/bench (inode, `blobs` index entry, directory entry and readdir cookie, as the coordinator
writes them: docs/coordinator.md layout) and each stopped node's LMDB gets a COMMITTED record
for every blob it is listed for, with no chunk data (so `--deep` would find every copy
missing; the plain check finds nothing). Blob ids are txids above the coordinator's
high-water mark, which is moved past them.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import lmdb

from dfs.meta.cluster import NEXT_INO, TXID_HWM
from dfs.meta.codec import U64x2, k64, pack, unpack
from dfs.meta.inode import Inode
from dfs.meta.txnlog import FIRST_TXID
from storage_node.layout import BlobInfo, BlobState, blob_key, pack_info

SIZE = 4096
CHECKSUM = b"\x5a" * 16
BATCH = 50_000  # rows per LMDB write transaction
MAP_SIZE = 1 << 36  # sparse: LMDB only uses what it writes


def seed_coordinator(path: Path, directory: int, count: int, nodes: list[int], r: int
                     ) -> list[tuple[int, list[int]]]:
    """Add `count` files to directory ino `directory`; (first blob id, replicas per i) back
    as (start, placement) for the nodes: file i has blob start + i on placement[i % len]."""
    env = lmdb.open(str(path), max_dbs=16, subdir=True, map_size=MAP_SIZE)
    try:
        dbs = {n: env.open_db(n.encode())
               for n in ("inodes", "dentries", "dircookies", "blobs", "meta")}
        with env.begin(write=True) as txn:
            first_ino = unpack(txn.get(NEXT_INO, db=dbs["meta"]) or pack(2))
            first_blob = unpack(txn.get(TXID_HWM, db=dbs["meta"]) or pack(FIRST_TXID))
            parent = Inode.decode(directory, txn.get(k64(directory), db=dbs["inodes"]))
            first_cookie = parent.next_cookie
            parent.next_cookie += count
            txn.put(k64(directory), parent.encode(), db=dbs["inodes"])
            txn.put(NEXT_INO, pack(first_ino + count), db=dbs["meta"])
            txn.put(TXID_HWM, pack(first_blob + count), db=dbs["meta"])
        now = time.time_ns()
        placements = [[nodes[(k + j) % len(nodes)] for j in range(r)] for k in range(len(nodes))]
        for start in range(0, count, BATCH):
            with env.begin(write=True) as txn:
                for i in range(start, min(count, start + BATCH)):
                    ino, blob, name = first_ino + i, first_blob + i, f"s{i:08d}".encode()
                    inode = Inode(ino=ino, mode=stat.S_IFREG | 0o644, size=SIZE, atime_ns=now,
                                  mtime_ns=now, ctime_ns=now, version=1, blob=blob,
                                  checksum=CHECKSUM, replicas=placements[i % len(nodes)])
                    txn.put(k64(ino), inode.encode(), db=dbs["inodes"])
                    txn.put(k64(blob), k64(ino), db=dbs["blobs"])
                    cookie = first_cookie + i
                    txn.put(k64(directory) + name, U64x2.pack(ino, cookie), db=dbs["dentries"])
                    txn.put(U64x2.pack(directory, cookie), name, db=dbs["dircookies"])
    finally:
        env.close()
    return [(first_blob, p) for p in placements]


def seed_node(path: Path, node: int, count: int, first_blob: int,
              placements: list[list[int]]) -> int:
    """A COMMITTED record (no data) of every seeded blob listed on `node`; how many."""
    env = lmdb.open(str(path), max_dbs=8, subdir=True, map_size=MAP_SIZE)
    written = 0
    try:
        db = env.open_db(b"blobs")
        created = time.time()
        holds = [node in p for p in placements]
        for start in range(0, count, BATCH):
            with env.begin(write=True, db=db) as txn:
                for i in range(start, min(count, start + BATCH)):
                    if holds[i % len(placements)]:
                        blob = first_blob + i
                        info = BlobInfo(blob, BlobState.COMMITTED, SIZE, CHECKSUM, 1, created)
                        txn.put(blob_key(blob), pack_info(info))
                        written += 1
    finally:
        env.close()
    return written
