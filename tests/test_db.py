"""The group-committing LMDB writer: batching, isolation of failures, map growth."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import lmdb
import pytest
import trio
import trio.testing

from dfs import failpoints, runtime
from dfs.db import Database, WriterStopped, install_environments
from dfs.sim.lmdb_model import SimDisks


@pytest.fixture
async def db(tmp_path: Path, nursery):
    database = Database(tmp_path / "env", ["kv"], map_size=1 << 20)
    await nursery.start(database.run_writer)
    yield database
    database.close()


async def test_concurrent_writes_share_batches_and_all_land(db: Database, monkeypatch) -> None:
    batches: list[int] = []
    real = db._commit_batch

    def counting(batch):
        batches.append(len(batch))
        return real(batch)

    monkeypatch.setattr(db, "_commit_batch", counting)

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


# ---------------------------------------------------------------- power loss (simulated disk)


class SteppedHost(runtime.Host):
    """Worker calls run inline on the trio thread, each only when the test lets it."""

    def __init__(self, threads: bool = False) -> None:
        self.calls, self._next = trio.open_memory_channel[trio.Event](0)
        self.threads = threads

    async def in_thread(self, fn, *args):
        go = trio.Event()
        await self.calls.send(go)
        await go.wait()
        if self.threads:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def step(self) -> None:
        """Let the next worker call (a commit, then the flush of a durable batch) run."""
        (await self._next.receive()).set()


class InlineHost(runtime.Host):
    """The simulator's way: worker calls run on the trio thread, after a checkpoint."""

    async def in_thread(self, fn, *args):
        await trio.lowlevel.checkpoint()
        return fn(*args)


@pytest.fixture
def disks():
    """The simulated engine, with worker calls inline (the model is not thread-safe)."""
    disks = SimDisks()
    previous = install_environments(disks.open)
    host = runtime.install(InlineHost())
    yield disks
    runtime.install(host)
    install_environments(previous)


@pytest.fixture
def split_flush():
    """A failpoint hook, as the simulator installs: commit and flush become two worker calls
    (with `db.before_flush` between them), which a SteppedHost lets run one at a time."""
    async def noop(name: str) -> None:
        pass

    previous = failpoints._hook
    failpoints.install_hook(noop)
    yield
    failpoints.install_hook(previous)


@pytest.fixture
def stepped(disks, split_flush):
    host = SteppedHost()
    previous = runtime.install(host)
    yield host
    runtime.install(previous)


def sim_db(disks: SimDisks) -> Database:
    return Database("/sim/node-1", ["kv"])


def get(db: Database, key: bytes) -> bytes | None:
    return db.read(lambda txn: txn.get(key, db=db["kv"]))


async def test_a_durable_write_that_returned_survives_a_crash(disks: SimDisks, nursery) -> None:
    db = sim_db(disks)
    await nursery.start(db.run_writer)
    await db.write(lambda txn: txn.put(b"k", b"forced", db=db["kv"]))
    assert disks.crash("/sim/node-1", random.Random(1)) == 0
    again = sim_db(disks)
    assert get(again, b"k") == b"forced"


async def test_an_unforced_write_may_be_lost_but_the_environment_is_intact(
    disks: SimDisks, nursery
) -> None:
    db = sim_db(disks)
    await nursery.start(db.run_writer)
    await db.write(lambda txn: txn.put(b"a", b"1", db=db["kv"]))
    await db.write(lambda txn: txn.put(b"b", b"2", db=db["kv"]), durable=False)
    assert get(db, b"b") == b"2"  # non-durable writes are visible unforced, by design
    assert disks.crash("/sim/node-1") == 1
    again = sim_db(disks)
    assert (get(again, b"a"), get(again, b"b")) == (b"1", None)
    assert again.read(lambda txn: txn.stat(again["kv"])["entries"]) == 1
    again.write_now(lambda txn: txn.put(b"c", b"3", db=again["kv"]))
    assert get(again, b"c") == b"3"


async def test_a_durable_batch_is_invisible_until_flushed(
    disks: SimDisks, stepped: SteppedHost, nursery
) -> None:
    db = sim_db(disks)
    db.write_now(lambda txn: txn.put(b"k", b"old", db=db["kv"]))
    await nursery.start(db.run_writer)
    done = trio.Event()

    async def write() -> None:
        await db.write(lambda txn: txn.put(b"k", b"new", db=db["kv"]))
        done.set()

    nursery.start_soon(write)
    await stepped.step()  # the commit
    await trio.testing.wait_all_tasks_blocked()
    assert disks.unforced("/sim/node-1") == 1, "the batch is committed, not flushed"
    assert get(db, b"k") == b"old", "a reader saw a durable write before its flush"
    with db.snapshot() as txn:
        assert txn.get(b"k", db=db["kv"]) == b"old"
    assert not done.is_set()
    await stepped.step()  # the flush
    await done.wait()
    assert disks.unforced("/sim/node-1") == 0, "a durable write returned unflushed"
    assert get(db, b"k") == b"new"


async def test_the_planted_bug_shows_a_write_before_its_flush(
    disks: SimDisks, stepped: SteppedHost, nursery, monkeypatch
) -> None:
    """The simulator's planted bug (hide_unforced=False) is what the test above catches."""
    monkeypatch.setattr(Database, "hide_unforced", False)
    db = sim_db(disks)
    db.write_now(lambda txn: txn.put(b"k", b"old", db=db["kv"]))
    await nursery.start(db.run_writer)
    nursery.start_soon(db.write, lambda txn: txn.put(b"k", b"new", db=db["kv"]))
    await stepped.step()  # the commit
    await trio.testing.wait_all_tasks_blocked()
    assert get(db, b"k") == b"new"
    assert disks.crash("/sim/node-1") == 1
    assert get(sim_db(disks), b"k") == b"old", "what was read is gone after the power cut"


async def test_disk_full_fails_the_batch_and_keeps_serving(disks: SimDisks, nursery) -> None:
    db = sim_db(disks)
    await nursery.start(db.run_writer)
    disks.set_full("/sim/node-1", True)
    with pytest.raises(lmdb.Error, match="No space left"):
        await db.write(lambda txn: txn.put(b"k", b"v", db=db["kv"]))
    disks.set_full("/sim/node-1", False)
    await db.write(lambda txn: txn.put(b"k", b"v", db=db["kv"]))
    assert get(db, b"k") == b"v"


async def test_on_real_lmdb_readers_in_the_window_see_the_old_state(
    tmp_path: Path, nursery, split_flush
) -> None:
    """Real threads: a trio-thread read uses the pin; a worker-thread read waits for the flush."""
    host = SteppedHost(threads=True)
    previous = runtime.install(host)
    try:
        db = Database(tmp_path / "env", ["kv"])
        db.write_now(lambda txn: txn.put(b"k", b"old", db=db["kv"]))
        await nursery.start(db.run_writer)
        done = trio.Event()

        async def write() -> None:
            await db.write(lambda txn: txn.put(b"k", b"new", db=db["kv"]))
            done.set()

        worker_saw: list[bytes | None] = []

        async def worker_read() -> None:
            worker_saw.append(await trio.to_thread.run_sync(get, db, b"k"))

        nursery.start_soon(write)
        await host.step()  # the commit
        await trio.testing.wait_all_tasks_blocked()
        assert get(db, b"k") == b"old"
        nursery.start_soon(worker_read)
        await trio.sleep(0.2)
        assert worker_saw == [], "a worker-thread read ran inside the window"
        await host.step()  # the flush
        await done.wait()
        while not worker_saw:
            await trio.sleep(0.01)
        assert worker_saw == [b"new"] and get(db, b"k") == b"new"
        db.close()
    finally:
        runtime.install(previous)


async def test_one_worker_call_commits_and_flushes_and_hides_the_batch_until_then(
    tmp_path: Path, nursery, monkeypatch
) -> None:
    """Production (no failpoint can fire between them): commit and flush are one worker call,
    and a trio-thread read while that call is inside the flush still sees the old state."""
    db = Database(tmp_path / "env", ["kv"])
    db.write_now(lambda txn: txn.put(b"k", b"old", db=db["kv"]))
    await nursery.start(db.run_writer)
    hops: list[str] = []
    in_flush, release = threading.Event(), threading.Event()
    real_sync, real_host = db._sync, runtime._host

    def held_sync() -> None:
        in_flush.set()
        release.wait(10)
        real_sync()

    class Counting(runtime.Host):
        async def in_thread(self, fn, *args):
            hops.append(getattr(fn, "__name__", "?"))
            return await real_host.in_thread(fn, *args)

    monkeypatch.setattr(db, "_sync", held_sync)
    previous = runtime.install(Counting())
    try:
        done = trio.Event()

        async def write() -> None:
            await db.write(lambda txn: txn.put(b"k", b"new", db=db["kv"]))
            done.set()

        nursery.start_soon(write)
        await trio.to_thread.run_sync(in_flush.wait, 10)
        assert get(db, b"k") == b"old", "a reader saw a durable write before its flush"
        release.set()
        await done.wait()
        assert get(db, b"k") == b"new"
        assert hops == ["_commit_and_flush"], hops
    finally:
        runtime.install(previous)
        db.close()


async def test_a_write_after_the_writer_stopped_fails_instead_of_hanging(tmp_path: Path) -> None:
    """A process shutting down (or, in the simulator, crashing) cancels its writer task while
    shielded code still writes (a repair's decision): that write must fail, not wait forever
    for a batch no one will run (it hung the simulator's seed 1012 and a coordinator's
    shutdown)."""
    db = Database(tmp_path / "env", ["kv"], map_size=1 << 20)
    try:
        async with trio.open_nursery() as n:
            await n.start(db.run_writer)
            n.cancel_scope.cancel()
        with trio.CancelScope(shield=True), trio.fail_after(2):
            with pytest.raises(WriterStopped):
                await db.write(lambda txn: txn.put(b"k", b"v", db=db["kv"]))
    finally:
        db.close()


async def test_writes_the_writer_had_not_finished_fail_when_it_is_cancelled(
    tmp_path: Path, nursery
) -> None:
    """The batch in flight and the requests queued behind it, when the writer is cancelled:
    each waiter hears WriterStopped (its write's fate unknown, as at a crash), none hangs."""
    host = SteppedHost()
    previous = runtime.install(host)
    try:
        db = Database(tmp_path / "env", ["kv"], map_size=1 << 20)
        outcomes: list[str] = []

        async def write(key: bytes) -> None:
            with trio.CancelScope(shield=True), trio.fail_after(2):
                try:
                    await db.write(lambda txn: txn.put(key, b"v", db=db["kv"]))
                    outcomes.append("written")
                except WriterStopped:
                    outcomes.append("stopped")

        async with trio.open_nursery() as writer:
            await writer.start(db.run_writer)
            nursery.start_soon(write, b"a")
            await host._next.receive()  # batch [a] is in its worker call, held there
            nursery.start_soon(write, b"b")
            await trio.testing.wait_all_tasks_blocked()
            writer.cancel_scope.cancel()
        with trio.fail_after(3):
            while len(outcomes) < 2:
                await trio.sleep(0.01)
        assert outcomes == ["stopped", "stopped"]
        db.close()
    finally:
        runtime.install(previous)
