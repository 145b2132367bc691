"""The group-committing LMDB writer: batching, isolation of failures, map growth."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dfs.db import Database


@pytest.fixture
async def db(tmp_path: Path, nursery):
    database = Database(tmp_path / "env", ["kv"], map_size=1 << 20)
    await nursery.start(database.run_writer)
    yield database
    database.close()


async def test_concurrent_writes_share_batches_and_all_land(db: Database, monkeypatch) -> None:
    batches: list[int] = []
    real = db._run_batch

    def counting(batch):
        batches.append(len(batch))
        return real(batch)

    monkeypatch.setattr(db, "_run_batch", counting)

    async def put(i: int) -> None:
        await db.write(lambda txn: txn.put(b"k%03d" % i, b"v", db=db["kv"]))

    async with trio.open_nursery() as n:
        for i in range(100):
            n.start_soon(put, i)
    assert db.read(lambda txn: txn.stat(db["kv"])["entries"]) == 100
    assert len(batches) < 100 and max(batches) > 1, "concurrent writers must share a commit"


async def test_a_failing_write_rolls_back_alone(db: Database) -> None:
    def bad(txn):
        txn.put(b"bad", b"1", db=db["kv"])
        raise KeyError("nope")

    async def good() -> None:
        await db.write(lambda txn: txn.put(b"good", b"1", db=db["kv"]))

    async with trio.open_nursery() as n:
        n.start_soon(good)
        with pytest.raises(KeyError):
            await db.write(bad)
    assert db.read(lambda txn: txn.get(b"good", db=db["kv"])) == b"1"
    assert db.read(lambda txn: txn.get(b"bad", db=db["kv"])) is None


async def test_map_full_grows_the_map(db: Database) -> None:
    for i in range(8):
        await db.write(lambda txn, i=i: txn.put(b"big%d" % i, b"x" * 400_000, db=db["kv"]))
    assert db.read(lambda txn: len(txn.get(b"big7", db=db["kv"]))) == 400_000
    assert db.env.info()["map_size"] > 1 << 20


async def test_reopened_readonly_sees_committed_data(tmp_path: Path, nursery) -> None:
    database = Database(tmp_path / "env", ["kv"])
    await nursery.start(database.run_writer)
    await database.write(lambda txn: txn.put(b"k", b"v", db=database["kv"]))
    database.close()
    ro = Database(tmp_path / "env", ["kv"], readonly=True)
    assert ro.read(lambda txn: txn.get(b"k", db=ro["kv"])) == b"v"
    ro.close()
