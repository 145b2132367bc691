"""The simulated LMDB engine answers like real LMDB, and a crash keeps exactly a forced prefix.

The simulator trusts dfs/sim/lmdb_model.py only as far as these tests compare it with
py-lmdb: the same program of operations runs on both and every answer must match.
"""

from __future__ import annotations

import random
import tempfile
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfs.sim.lmdb_model import SimDisks

NAMES = [b"one", b"two"]
keys = st.lists(st.sampled_from(b"ab\x00\xff"), min_size=1, max_size=3).map(bytes)
values = st.binary(max_size=4)
dbs = st.sampled_from(NAMES)


def leaf_ops() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("put"), dbs, keys, values, st.booleans()),
        st.tuples(st.just("delete"), dbs, keys),
        st.tuples(st.just("pop"), dbs, keys),
        st.tuples(st.just("replace"), dbs, keys, values),
        st.tuples(st.just("get"), dbs, keys | st.just(b"")),
        st.tuples(st.just("scan"), dbs, st.none() | keys | st.just(b""), st.integers(0, 6)),
        st.tuples(st.just("scan_back"), dbs, st.integers(0, 6)),
        st.tuples(st.just("drain"), dbs, keys, st.integers(0, 4)),
        st.tuples(st.just("stat"), dbs),
        st.tuples(st.just("names")),
    )


ops = st.one_of(
    leaf_ops(),
    st.tuples(st.just("nested"), st.lists(leaf_ops(), max_size=6), st.booleans()),
    st.tuples(st.just("commit")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("snap_scan"), dbs),
)


def apply(txn: Any, op: tuple[Any, ...], db: dict[bytes, Any]) -> Any:
    """One operation on txn; returns what it observed (the same type on both engines)."""
    kind = op[0]
    try:
        if kind == "put":
            return txn.put(op[2], op[3], overwrite=op[4], db=db[op[1]])
        if kind == "delete":
            return txn.delete(op[2], db=db[op[1]])
        if kind == "pop":
            return txn.pop(op[2], db=db[op[1]])
        if kind == "replace":
            return txn.replace(op[2], op[3], db=db[op[1]])
        if kind == "get":
            return txn.get(op[2], db=db[op[1]])
        if kind == "scan":
            with txn.cursor(db=db[op[1]]) as cur:
                found = cur.first() if op[2] is None else cur.set_range(op[2])
                out = [found, cur.item()]
                for _ in range(op[3]):  # stepping on from off the end: not modelled
                    out += [found := cur.next(), bytes(cur.key()), bytes(cur.value())]
                    if not found:
                        break
                return out + [list(cur.iternext(keys=False))]
        if kind == "scan_back":
            cur = txn.cursor(db=db[op[1]])
            out = [found := cur.last(), cur.item()]
            for _ in range(op[2]):
                if not found:
                    break
                out += [found := cur.prev(), cur.item()]
            return out + [list(cur.iternext(values=False))]
        if kind == "drain":  # the storage node's way to drop a blob's chunks
            cur = txn.cursor(db=db[op[1]])
            out = [cur.set_range(op[2])]
            for _ in range(op[3]):
                out += [cur.delete(), cur.key(), cur.value()]
            return out
        if kind == "stat":
            return txn.stat(db[op[1]])["entries"]
        if kind == "names":
            return [bytes(k) for k, _ in txn.cursor().iternext()]
    except lmdb.Error as e:
        return type(e).__name__
    raise AssertionError(op)


def run(env: Any, program: list[tuple[Any, ...]]) -> list[Any]:
    db = {name: env.open_db(name) for name in NAMES}
    seen: list[Any] = []
    txn = env.begin(write=True)
    snap = None
    for op in program:
        if op[0] == "nested":
            child = env.begin(write=True, parent=txn)
            seen.append([apply(child, o, db) for o in op[1]])
            if op[2]:
                child.commit()
            else:
                child.abort()
        elif op[0] == "commit":
            txn.commit()
            txn = env.begin(write=True)
        elif op[0] == "snapshot":
            if snap is not None:
                snap.abort()
            snap = env.begin()
        elif op[0] == "snap_scan":
            seen.append(None if snap is None else list(snap.cursor(db=db[op[1]])))
        else:
            seen.append(apply(txn, op, db))
    txn.commit()
    if snap is not None:
        seen.append([list(snap.cursor(db=db[n])) for n in NAMES])
        snap.abort()
    with env.begin() as final:
        seen.append([list(final.cursor(db=db[n])) for n in NAMES])
        seen.append([final.stat(db[n])["entries"] for n in NAMES])
    return seen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_model_answers_like_lmdb(program: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        real = lmdb.open(tmp, max_dbs=4, map_size=10 << 20, sync=False)
        try:
            want = run(real, program)
        finally:
            real.close()
    model = SimDisks().open("/sim/x", max_dbs=4, map_size=10 << 20)
    assert run(model, program) == want


def state(env: Any) -> list[list[tuple[bytes, bytes]]]:
    with env.begin() as txn:
        return [list(txn.cursor(db=env.open_db(n, create=False))) for n in NAMES]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["put", "delete", "sync"]), dbs, keys, values),
             max_size=30),
    st.integers(0, 2**32),
    st.booleans(),
)
def test_a_crash_keeps_the_forced_state_and_a_prefix_of_the_rest(
    steps: list[tuple[str, bytes, bytes, bytes]], seed: int, seeded: bool
) -> None:
    disks = SimDisks()
    env = disks.open("/sim/x", max_dbs=4)
    for name in NAMES:
        env.open_db(name)
    env.sync(True)
    states = [state(env)]  # the state after each commit
    forced = 0
    for kind, name, key, value in steps:
        if kind == "sync":
            env.sync(True)
            forced = len(states) - 1
            continue
        before = env.info()["last_txnid"]
        with env.begin(write=True) as txn:
            db = env.open_db(name)
            txn.put(key, value, db=db) if kind == "put" else txn.delete(key, db=db)
        if env.info()["last_txnid"] != before:  # a write txn that changed nothing commits nothing
            states.append(state(env))
    lost = disks.crash("/sim/x", random.Random(seed) if seeded else None)
    after = disks.open("/sim/x", max_dbs=4)
    if not seeded:
        assert state(after) == states[forced]
    assert state(after) == states[len(states) - 1 - lost]
    assert len(states) - 1 - lost >= forced
    with pytest.raises(lmdb.Error):
        env.begin()  # the crashed process's environment is dead
    with after.begin(write=True) as txn:  # and the disk takes new writes
        txn.put(b"k", b"v", db=after.open_db(NAMES[0]))
    assert state(after)[0][-1:] == [(b"k", b"v")] or (b"k", b"v") in state(after)[0]


def test_a_database_created_in_a_lost_commit_is_gone() -> None:
    disks = SimDisks()
    env = disks.open("/sim/x", max_dbs=4)
    env.open_db(b"kept")
    env.sync(True)
    env.open_db(b"lost")
    assert disks.crash("/sim/x") == 1
    env = disks.open("/sim/x", max_dbs=4)
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor()] == [b"kept"]
    with pytest.raises(lmdb.NotFoundError):
        env.open_db(b"lost", create=False)


def test_disk_full_fails_the_commit_and_writes_nothing() -> None:
    disks = SimDisks()
    env = disks.open("/sim/x", max_dbs=4)
    db = env.open_db(b"kv")
    disks.set_full("/sim/x", True)
    with pytest.raises(lmdb.DiskError, match="No space left on device"):
        with env.begin(write=True) as txn:
            txn.put(b"k", b"v", db=db)
    with env.begin() as txn:
        assert txn.get(b"k", db=db) is None
    disks.set_full("/sim/x", False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v", db=db)
    with env.begin() as txn:
        assert txn.get(b"k", db=db) == b"v"


def test_lmdb_mode_loses_at_most_the_last_commit() -> None:
    """strict=False follows LMDB: with sync=True each commit forces the one before it."""
    disks = SimDisks(strict=False)
    env = disks.open("/sim/x", max_dbs=4, sync=True, metasync=False)
    db = env.open_db(b"kv")
    for i in range(3):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v", db=db)
    assert disks.unforced("/sim/x") == 1
    assert disks.crash("/sim/x") == 1
    env = disks.open("/sim/x", max_dbs=4)
    with env.begin() as txn:
        assert [bytes(k) for k, _ in txn.cursor(db=env.open_db(b"kv"))] == [b"k0", b"k1"]
