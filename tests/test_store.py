"""BlobStore on a real LMDB environment: layout, 2PC state rules, checksums, space."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import time
from pathlib import Path

import lmdb
import msgpack
import pytest
import trio
import xxhash

from dfs.chunks import CHUNK_SIZE, file_checksum, nchunks
from dfs.errors import Code, DfsError
from storage_node.store import BlobState, BlobStore

MiB = 1024 * 1024


def blob_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def split(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


async def stage_all(store: BlobStore, txid: int, data: bytes) -> None:
    for index, chunk in enumerate(split(data)):
        await store.stage(txid, index, chunk)


async def prepare(store: BlobStore, txid: int, data: bytes) -> None:
    await store.prepare(txid, len(data), file_checksum(data), nchunks(len(data)))


def flip_byte(store: BlobStore, txid: int, index: int, offset: int = 100) -> None:
    """Bit rot: change one byte of a chunk's data behind the store's back."""
    key = struct.pack(">QI", txid, index)
    with store.db.env.begin(write=True) as txn:
        value = bytearray(txn.get(key, db=store.db["chunks"]))
        value[8 + offset] ^= 0xFF
        txn.put(key, bytes(value), db=store.db["chunks"])


def raises(code: Code) -> pytest.RaisesExc:
    return pytest.raises(DfsError, match=f"^{code.value}:")


@pytest.fixture
async def store(tmp_path: Path, nursery: trio.Nursery) -> BlobStore:
    s = BlobStore.open(tmp_path / "node")
    await nursery.start(s.db.run_writer)
    yield s
    s.close()


# ---------------------------------------------------------------- the happy path and layout


async def test_stage_prepare_commit_read_round_trip(store: BlobStore) -> None:
    data = blob_bytes(2 * CHUNK_SIZE + 12345)
    chunks = split(data)
    for index in (2, 0, 1):  # order of arrival doesn't matter
        await store.stage(7, index, chunks[index])
    info = store.stat(7)
    assert info.state == BlobState.STAGED and info.size is None and info.nchunks is None
    info = await store.prepare(7, len(data), file_checksum(data), 3)
    assert (info.state, info.size, info.nchunks) == (BlobState.PREPARED, len(data), 3)
    assert store.stat(7).checksum == file_checksum(data)
    assert store.read_chunk(7, 1)[0] == chunks[1]  # a PREPARED blob may be read (rule 6)
    assert (await store.commit(7)).state == BlobState.COMMITTED
    got = b"".join(store.read_chunk(7, i)[0] for i in range(3))
    assert got == data
    assert store.read_chunk(7, 2)[1] == xxhash.xxh3_64_digest(chunks[2])


async def test_layout_is_exactly_design_section_3(store: BlobStore) -> None:
    data = blob_bytes(CHUNK_SIZE + 5)
    await stage_all(store, 0x0102030405060708, data)
    raw_blob = struct.pack(">Q", 0x0102030405060708)
    with store.db.env.begin() as txn:
        staged = msgpack.unpackb(txn.get(raw_blob, db=store.db["blobs"]))
    assert set(staged) == {"state", "size", "checksum", "nchunks", "created"}
    assert staged["state"] == "STAGED" and staged["size"] is None and staged["checksum"] is None
    assert abs(staged["created"] - time.time()) < 60
    await prepare(store, 0x0102030405060708, data)
    await store.commit(0x0102030405060708)
    with store.db.env.begin() as txn:
        rec = msgpack.unpackb(txn.get(raw_blob, db=store.db["blobs"]))
        for index, chunk in enumerate(split(data)):
            value = txn.get(raw_blob + struct.pack(">I", index), db=store.db["chunks"])
            assert value[:8] == xxhash.xxh3_64(chunk).digest()  # canonical big-endian
            assert value[8:] == chunk
        assert [bytes(k) for k, _ in txn.cursor(db=store.db["chunks"])] == [
            raw_blob + b"\0\0\0\0",
            raw_blob + b"\0\0\0\1",
        ]
    assert rec["state"] == "COMMITTED" and rec["size"] == len(data) and rec["nchunks"] == 2
    assert rec["checksum"] == xxhash.xxh3_128(data).digest() and len(rec["checksum"]) == 16


async def test_identity_survives_reopen(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = BlobStore.open(tmp_path / "n")
    assert (store.node_id, store.cluster) == (0, "")
    await nursery.start(store.db.run_writer)
    await store.set_identity(42, "cluster-a")
    store.close()
    again = BlobStore.open(tmp_path / "n", readonly=True)
    assert (again.node_id, again.cluster) == (42, "cluster-a")
    again.close()


async def test_readonly_open_for_tools_while_node_stopped(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = BlobStore.open(tmp_path / "n")
    await nursery.start(store.db.run_writer)
    data = blob_bytes(1000)
    await stage_all(store, 5, data)
    await prepare(store, 5, data)
    store.close()
    tool = BlobStore.open(tmp_path / "n", readonly=True)
    try:
        assert tool.stat(5).state == BlobState.PREPARED
        assert tool.read_chunk(5, 0)[0] == data
        assert [i.blob for i in tool.list()] == [5]
    finally:
        tool.close()
    with raises(Code.EINVAL):
        BlobStore.open(tmp_path / "nowhere", readonly=True)


def test_refuses_a_data_dir_of_another_kind(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "coord"), max_dbs=4)
    env.open_db(b"inodes")
    env.close()
    with raises(Code.EINVAL):
        BlobStore.open(tmp_path / "coord")
    (tmp_path / "file").write_bytes(b"x")
    with raises(Code.EINVAL):
        BlobStore.open(tmp_path / "file")


# ---------------------------------------------------------------- prepare: the vote


async def test_wrong_checksum_votes_no_and_blob_stays_staged(store: BlobStore) -> None:
    data = blob_bytes(3000)
    await stage_all(store, 9, data)
    with raises(Code.CHECKSUM):
        await store.prepare(9, len(data), file_checksum(data + b"x"), 1)
    assert store.stat(9).state == BlobState.STAGED


async def test_missing_chunk_votes_no(store: BlobStore) -> None:
    data = blob_bytes(3 * CHUNK_SIZE)
    await store.stage(9, 0, data[:CHUNK_SIZE])
    await store.stage(9, 2, data[2 * CHUNK_SIZE :])
    with raises(Code.ENOENT):
        await prepare(store, 9, data)
    await store.stage(10, 0, data[:CHUNK_SIZE])
    with raises(Code.ENOENT):  # the last one missing
        await prepare(store, 10, data[: 2 * CHUNK_SIZE])
    with raises(Code.ENOENT):  # nothing staged at all
        await prepare(store, 11, data)
    assert store.stat(9).state == BlobState.STAGED and store.stat(11) is None


async def test_chunks_must_fit_size_and_nchunks(store: BlobStore) -> None:
    data = blob_bytes(CHUNK_SIZE + 10)
    await store.stage(3, 0, data[:1000])  # a short chunk that is not the last
    await store.stage(3, 1, data[1000:])
    with raises(Code.EINVAL):
        await store.prepare(3, len(data), file_checksum(data), 2)
    with raises(Code.EINVAL):
        await store.prepare(3, len(data), file_checksum(data), 5)  # nchunks can't hold size
    small = blob_bytes(10)
    await store.stage(4, 0, small)
    await store.stage(4, 1, small)  # a chunk beyond nchunks
    with raises(Code.EINVAL):
        await store.prepare(4, 10, file_checksum(small), 1)


async def test_corrupt_chunk_is_caught_at_prepare(store: BlobStore) -> None:
    data = blob_bytes(2 * CHUNK_SIZE)
    await stage_all(store, 12, data)
    flip_byte(store, 12, 1)
    with raises(Code.CHECKSUM):
        await prepare(store, 12, data)
    assert store.stat(12).state == BlobState.STAGED


async def test_the_store_prepares_and_commits_only_from_the_states_asked(
        store: BlobStore) -> None:
    """Whether a prepared blob votes again, or a committed one acks again, is the
    participant's rule (test_participant.py, test_node_server.py); the store applies a
    transition only from a state the participant allowed."""
    data = blob_bytes(5000)
    await stage_all(store, 1, data)
    await store.prepare(1, len(data), file_checksum(data), 1)
    with raises(Code.CONFLICT):
        await store.prepare(1, len(data), file_checksum(data), 1)
    await store.commit(1)
    with raises(Code.CONFLICT):
        await store.commit(1)
    with raises(Code.CONFLICT):
        await store.prepare(1, len(data), file_checksum(data), 1)
    assert store.stat(1).state == BlobState.COMMITTED


async def test_empty_blob_needs_no_chunks(store: BlobStore) -> None:
    with raises(Code.CHECKSUM):
        await store.prepare(20, 0, file_checksum(b"not empty"), 0)
    info = await store.prepare(20, 0, file_checksum(b""), 0)
    assert info.state == BlobState.PREPARED and info.nchunks == 0
    assert (await store.commit(20)).size == 0


# ---------------------------------------------------------------- stage / commit / abort rules


async def test_stage_rules(store: BlobStore) -> None:
    data = blob_bytes(4000)
    await store.stage(2, 0, data)
    await store.stage(2, 0, data)  # a retried stage is harmless
    with raises(Code.CONFLICT):
        await store.stage(2, 0, data[::-1])  # a staged chunk never changes
    with raises(Code.EINVAL):
        await store.stage(2, 1, b"x" * (CHUNK_SIZE + 1))
    await prepare(store, 2, data)
    with raises(Code.CONFLICT):
        await store.stage(2, 0, data)  # nothing is staged into a prepared blob
    assert store.read_chunk(2, 0)[0] == data


async def test_commit_rules(store: BlobStore) -> None:
    with raises(Code.ENOENT):
        await store.commit(99)
    await store.stage(5, 0, b"abc")
    with raises(Code.CONFLICT):
        await store.commit(5)  # never prepared
    await prepare(store, 5, b"abc")
    assert (await store.commit(5)).state == BlobState.COMMITTED


async def test_abort_drops_staged_and_prepared_never_committed(store: BlobStore) -> None:
    data = blob_bytes(CHUNK_SIZE + 1)
    for txid in (1, 2, 3):
        await stage_all(store, txid, data)
    await prepare(store, 2, data)
    await prepare(store, 3, data)
    await store.commit(3)
    used = store.used()
    assert await store.abort(1) and await store.abort(2)
    assert not await store.abort(1)  # duplicate ABORT
    with raises(Code.CONFLICT):
        await store.abort(3)
    assert store.stat(1) is None and store.stat(2) is None
    with store.db.env.begin() as txn:
        keys = [bytes(k) for k, _ in txn.cursor(db=store.db["chunks"])]
    assert {struct.unpack(">QI", k)[0] for k in keys} == {3}
    assert store.used() < used - CHUNK_SIZE  # the space of two blobs is free again
    assert store.read_chunk(3, 1)[0] == data[CHUNK_SIZE:]


async def test_delete_takes_any_state(store: BlobStore) -> None:
    for txid in (1, 2, 3):
        await store.stage(txid, 0, b"x")
    await prepare(store, 2, b"x")
    await prepare(store, 3, b"x")
    await store.commit(3)
    assert await store.delete([1, 2, 3, 4]) == 3
    assert store.list() == [] and store.count() == 0


# ---------------------------------------------------------------- reads


async def test_read_errors(store: BlobStore) -> None:
    with raises(Code.ENOENT):
        store.read_chunk(1, 0)  # deleted (or never here): the client reads ESTALE
    await store.stage(1, 0, b"hello")
    with raises(Code.ENOENT):
        store.read_chunk(1, 0)  # not prepared: unverified bytes are not served
    await prepare(store, 1, b"hello")
    await store.commit(1)
    with raises(Code.EINVAL):
        store.read_chunk(1, 1)
    flip_byte(store, 1, 0, offset=2)
    with raises(Code.CHECKSUM):
        store.read_chunk(1, 0)


async def test_list_pages_by_blob_id_and_stat(store: BlobStore) -> None:
    for txid in (30, 10, 2**64 - 1, 20):
        await store.stage(txid, 0, b"z")
    await prepare(store, 20, b"z")
    assert [i.blob for i in store.list(0, 2)] == [10, 20]
    assert [i.blob for i in store.list(20, 10)] == [30, 2**64 - 1]
    assert store.list(2**64 - 1) == [] and store.list(0, 0) == []
    assert store.list(10, 1)[0].state == BlobState.PREPARED
    assert store.stat(20).to_wire()["checksum"] == file_checksum(b"z")
    assert sorted(i.blob for i in store.pending()) == [10, 20, 30, 2**64 - 1]


# ---------------------------------------------------------------- space


async def test_capacity_override_gives_enospc(tmp_path: Path, nursery: trio.Nursery) -> None:
    store = BlobStore.open(tmp_path / "n", capacity=3 * MiB)
    await nursery.start(store.db.run_writer)
    data = blob_bytes(CHUNK_SIZE)
    await store.stage(1, 0, data)
    await store.stage(2, 0, data)
    with raises(Code.ENOSPC):
        await store.stage(3, 0, data)
    assert store.stat(3) is None
    assert store.capacity() == 3 * MiB and 2 * MiB < store.used() <= 3 * MiB
    await store.abort(1)
    await store.stage(3, 0, data)  # the freed space is usable again
    store.close()


async def test_used_and_capacity_without_override(store: BlobStore) -> None:
    before = store.used()
    await store.stage(1, 0, blob_bytes(CHUNK_SIZE))
    assert store.used() >= before + CHUNK_SIZE
    st = os.statvfs(store.db.path)
    assert store.capacity() >= store.used() + st.f_bavail * st.f_frsize - 64 * MiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Path:
    """A 4 MiB tmpfs: a real full disk (needs root; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_real_disk_full_is_enospc_and_store_keeps_working(tiny_fs: Path) -> None:
    store = BlobStore.open(tiny_fs / "n", map_size=1 << 30)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.db.run_writer)
            data = blob_bytes(CHUNK_SIZE)
            staged = []
            with raises(Code.ENOSPC):
                for txid in range(1, 10):
                    await store.stage(txid, 0, data)
                    staged.append(txid)
            assert staged, "nothing fit on the tiny disk"
            assert store.stat(staged[-1] + 1) is None
            await prepare(store, staged[0], data)  # the writer and the env survived
            assert store.read_chunk(staged[0], 0)[0] == data
            for txid in staged[1:]:
                await store.abort(txid)
            await store.stage(100, 0, data[:1000])
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_write_error_that_is_not_a_full_disk_is_internal_when_space_is_low(
        tiny_fs: Path) -> None:
    """Low space alone does not make an error ENOSPC: a COMMIT that fails for another reason
    must be INTERNAL, which the coordinator retries, rather than ENOSPC, which marks the replica
    bad. (A 4 MiB disk is always below the full-disk slack.)"""
    store = BlobStore.open(tiny_fs / "n", map_size=1 << 30)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.db.run_writer)
            await store.stage(1, 0, b"x")

            def bad_key(txn: lmdb.Transaction) -> None:
                txn.put(b"k" * 1000, b"v", db=store.db["meta"])  # MDB_BAD_VALSIZE

            with raises(Code.INTERNAL):
                await store._write(bad_key, durable=True, blobs=())
            with raises(Code.ENOSPC):  # a real full disk still is ENOSPC
                for txid in range(2, 12):
                    await store.stage(txid, 0, blob_bytes(CHUNK_SIZE))
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_concurrent_prepares_share_fsyncs(store: BlobStore, monkeypatch) -> None:
    syncs = []
    real_sync = store.db._sync

    def slow_sync() -> None:
        syncs.append(1)
        time.sleep(0.02)  # a disk with real fsync latency
        real_sync()

    monkeypatch.setattr(store.db, "_sync", slow_sync)
    blobs = {txid: blob_bytes(20_000, seed=txid) for txid in range(1, 21)}
    for txid, data in blobs.items():
        await store.stage(txid, 0, data)
    assert syncs == []  # staging is never forced
    async with trio.open_nursery() as nursery:
        for txid, data in blobs.items():
            nursery.start_soon(prepare, store, txid, data)
    assert all(store.stat(t).state == BlobState.PREPARED for t in blobs)
    assert 1 <= len(syncs) <= 10  # group commit: 20 forced prepares, far fewer fsyncs
