"""The node's deep verification (`verify_blob`) and scrubber on a real BlobStore."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio
from test_store import MiB, blob_bytes, flip_byte, prepare, stage_all

from dfs.chunks import CHUNK_SIZE, file_checksum
from storage_node.maintenance import Scrubber, verify_blob
from storage_node.store import BlobStore


@pytest.fixture
async def store(tmp_path: Path, nursery: trio.Nursery) -> BlobStore:
    s = BlobStore.open(tmp_path / "node")
    await nursery.start(s.db.run_writer)
    yield s
    s.close()


async def committed(store: BlobStore, txid: int, data: bytes) -> None:
    await stage_all(store, txid, data)
    await prepare(store, txid, data)
    await store.commit(txid)


async def test_verify_names_every_bad_chunk_and_a_wrong_whole(store: BlobStore) -> None:
    data = blob_bytes(3 * MiB + 5)
    await committed(store, 7, data)
    assert verify_blob(store, 7).ok
    flip_byte(store, 7, 0)
    flip_byte(store, 7, 3, offset=2)
    verdict = verify_blob(store, 7)
    assert not verdict.ok and verdict.bad_chunks == [0, 3]
    # A chunk replaced together with its digest passes chunk checks but not the whole hash.
    await committed(store, 8, data)
    key = struct.pack(">QI", 8, 1)
    other = blob_bytes(CHUNK_SIZE, seed=9)
    with store.db.env.begin(write=True) as txn:
        from dfs.chunks import chunk_digest

        txn.put(key, chunk_digest(other) + other, db=store.db["chunks"])
    verdict = verify_blob(store, 8)
    assert not verdict.ok and verdict.bad_chunks == [] and "checksum" in verdict.error
    with store.db.env.begin(write=True) as txn:
        txn.delete(struct.pack(">QI", 8, 2), db=store.db["chunks"])
    assert verify_blob(store, 8).bad_chunks == [2]
    assert verify_blob(store, 99).state is None


async def test_verify_of_staged_and_empty_blobs(store: BlobStore) -> None:
    await stage_all(store, 5, b"abc")
    assert verify_blob(store, 5).error == "only staged"
    await store.prepare(6, 0, file_checksum(b""), 0)
    assert verify_blob(store, 6).ok


async def test_scrubber_reports_corrupt_blobs_once_reported(store: BlobStore) -> None:
    for txid in (1, 2, 3):
        await committed(store, txid, blob_bytes(1000 + txid, seed=txid))
    flip_byte(store, 2, 0, offset=10)
    reports: list[list[int]] = []
    failures = [2]  # the coordinator is away for the whole first pass

    async def report(blobs: list[int], reason: str) -> None:
        if failures[0]:
            failures[0] -= 1
            from dfs.errors import Code, DfsError

            raise DfsError(Code.UNAVAILABLE, "coordinator away")
        reports.append(blobs)

    scrubber = Scrubber(store, rate=1e9, interval=1.0, report=report)
    await scrubber.one_pass()
    assert reports == [] and scrubber.unreported == {2}, "kept for the next try"
    await scrubber.one_pass()
    assert reports == [[2]] and scrubber.unreported == set()
    assert scrubber.corrupt_found == 2
