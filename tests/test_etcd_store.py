"""The coordinator's metadata with etcd as its durable copy (dfs/etcd), against real etcd.

A MetaStore over a mirrored Database writes every batch to etcd, fenced by the leader's
election key, before LMDB commits it; a new leader loads the LMDB back from etcd.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from etcd_harness import EtcdCluster, TcpProxy, free_port
from etcd_meta_helpers import etcd_dump
from meta_helpers import GRACE, dump

from dfs.db import Database
from dfs.errors import Code, DfsError, InDoubt
from dfs.etcd.client import EtcdClient, EtcdError
from dfs.etcd.election import Election, Leadership, LostLeadership
from dfs.etcd.mirror import EtcdMirror, load, subdb_prefix
from dfs.meta import ROOT_INO, SUBDBS, MetaStore

NOW = 1_000 * 10**9
DIR = stat.S_IFDIR | 0o755
TTL = 2


def election(client: EtcdClient, prefix: str) -> Election:
    return Election(client, f"{prefix}/leader".encode(), ttl=TTL)


def open_mirrored(path: Path, client: EtcdClient, prefix: str,
                  leadership: Leadership) -> MetaStore:
    mirror = EtcdMirror(client, f"{prefix}/meta", leadership)
    return MetaStore.open(path, gc_grace_ns=GRACE, map_size=1 << 24, mirror=mirror)


def everything(client: EtcdClient, prefix: str) -> list[tuple[bytes, bytes, int]]:
    return [(kv.key, kv.value, kv.mod_revision) for kv in client.range(
        f"{prefix}/".encode(), prefix=True).kvs]


async def mkdir(store: MetaStore, parent: int, name: bytes) -> Any:
    return await store.db.write(
        lambda t: store.namespace.mkdir(t, parent, name, DIR, 0, 0, NOW))


async def test_namespace_lands_in_etcd_and_loads_back_byte_for_byte(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    client = etcd.client()
    lead = await election(client, prefix).campaign("coord-a")
    store = open_mirrored(tmp_path / "a", client, prefix, lead)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        docs = await mkdir(store, ROOT_INO, b"docs")
        async with trio.open_nursery() as group:  # concurrent: they share batches
            for i in range(20):
                group.start_soon(mkdir, store, docs["ino"], b"d%d" % i)
        await store.db.write(lambda t: store.namespace.rename(
            t, docs["ino"], b"d0", ROOT_INO, b"moved", 0, NOW))
        await store.db.write(lambda t: store.namespace.rmdir(t, docs["ino"], b"d1", NOW))
        nursery.cancel_scope.cancel()
    local = dump(store)
    assert etcd_dump(client, prefix) == local
    names = {k[8:] for k, _ in local["dentries"]}
    assert {b"docs", b"moved", b"d2"} <= names and b"d1" not in names

    # A fresh cache, loaded from etcd alone, is the same metadata.
    fresh = Database(tmp_path / "fresh", SUBDBS, map_size=1 << 24)
    revision = load(client, f"{prefix}/meta", fresh)
    assert revision > lead.create_revision
    copy = {name: fresh.read(lambda t, n=name: list(t.cursor(db=fresh[n])))
            for name in SUBDBS}
    assert copy == local
    fresh.close()
    # So is a store opened by the next leader (it loads, and keeps the cluster id).
    await election(client, prefix).resign(lead)
    nxt = await election(client, prefix).campaign("coord-b")
    other = open_mirrored(tmp_path / "b", client, prefix, nxt)
    assert dump(other) == local and other.cluster_id == store.cluster_id
    store.close()
    other.close()


async def test_a_deposed_leader_cannot_write(etcd: EtcdCluster, prefix: str,
                                             tmp_path: Path) -> None:
    client = etcd.client()
    old = await election(client, prefix).campaign("coord-a")
    store = open_mirrored(tmp_path / "a", client, prefix, old)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        await mkdir(store, ROOT_INO, b"before")
        # Its lease is gone (a partition, a long pause) and another coordinator won...
        client.lease_revoke(old.lease_id)
        new = await election(client, prefix).campaign("coord-b")
        assert new.create_revision > old.create_revision
        local, remote = dump(store), everything(client, prefix)
        # ...while the old one still believes it leads (its local lease clock says so).
        old.renewed_at = time.monotonic()
        with pytest.raises(LostLeadership):
            await mkdir(store, ROOT_INO, b"late")
        with pytest.raises(LostLeadership):  # and it stays deposed
            await mkdir(store, ROOT_INO, b"later")
        nursery.cancel_scope.cancel()
    assert dump(store) == local
    assert everything(client, prefix) == remote
    store.close()


async def test_a_large_batch_spans_etcd_txns_but_each_request_stays_atomic(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    client = etcd.client()
    lead = await election(client, prefix).campaign("coord-a")
    store = open_mirrored(tmp_path / "a", client, prefix, lead)
    mirror = store.db.mirror
    assert isinstance(mirror, EtcdMirror)
    results: dict[bytes, Any] = {}
    too_big: list[DfsError] = []

    async def one(name: bytes) -> None:
        results[name] = await mkdir(store, ROOT_INO, name)

    async def huge() -> None:  # 200 keys in one request: over etcd's 128 ops per txn
        gc = store.db["gc"]
        try:
            await store.db.write(lambda t: [t.put(b"k%03d" % i, b"", db=gc) for i in range(200)])
        except DfsError as e:
            too_big.append(e)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        before = mirror.txns_sent
        async with trio.open_nursery() as group:
            for i in range(100):  # 3 keys of its own each (+ root, next_ino): ~300 keys
                group.start_soon(one, b"dir%02d" % i)
            group.start_soon(huge)
        sent = mirror.txns_sent - before
        nursery.cancel_scope.cancel()
    assert len(results) == 100
    assert [e.code for e in too_big] == [Code.TOO_BIG]
    assert dump(store)["gc"] == [] and etcd_dump(client, prefix)["gc"] == []
    assert sent >= 3  # split across etcd txns...
    # ...and each mkdir's inode, dentry and cookie landed in one of them (one revision).
    base = f"{prefix}/meta"
    revisions = set()
    for name, attr in results.items():
        keys = [subdb_prefix(base, "inodes") + attr["ino"].to_bytes(8, "big"),
                subdb_prefix(base, "dentries") + ROOT_INO.to_bytes(8, "big") + name]
        revs = {client.get(k).mod_revision for k in keys}  # type: ignore[union-attr]
        assert len(revs) == 1, name
        revisions |= revs
    assert len(revisions) >= 3
    assert etcd_dump(client, prefix) == dump(store)
    store.close()


async def test_a_divisible_sweep_over_etcds_limits_lands_in_pieces(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    """A GC sweep of 300 independent entries (db.write(divisible=True)) must not fail as one
    too-big etcd txn forever: it lands, in txns each within 128 operations."""
    client = etcd.client()
    lead = await election(client, prefix).campaign("coord-a")
    store = open_mirrored(tmp_path / "a", client, prefix, lead)
    mirror = store.db.mirror
    assert isinstance(mirror, EtcdMirror)
    gc = store.db["gc"]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        before = mirror.txns_sent
        await store.db.write(lambda t: [t.put(b"k%03d" % i, b"v", db=gc) for i in range(300)],
                             divisible=True)
        sent = mirror.txns_sent - before
        await store.db.write(lambda t: [t.delete(b"k%03d" % i, db=gc) for i in range(300)],
                             durable=False, divisible=True)
        nursery.cancel_scope.cancel()
    assert sent >= 3
    assert dump(store)["gc"] == [] and etcd_dump(client, prefix)["gc"] == []
    assert etcd_dump(client, prefix) == dump(store)
    store.close()


async def test_unreachable_etcd_is_unavailable_within_the_timeout(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    client = etcd.client(timeout=0.5)
    lead = await election(client, prefix).campaign("coord-a")
    store = open_mirrored(tmp_path / "a", client, prefix, lead)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        await mkdir(store, ROOT_INO, b"before")
        local = dump(store)
        etcd.pause(0)  # accepts connections, answers nothing: the worst case for a client
        try:
            started = trio.current_time()
            with pytest.raises(InDoubt) as info:
                await mkdir(store, ROOT_INO, b"during")
            took = trio.current_time() - started
            assert dump(store) == local  # nothing visible locally
        finally:
            etcd.resume(0)
        assert info.value.code is Code.UNAVAILABLE and took < 1.5, (info.value, took)
        # It may have landed: this leader never writes again; the next one reads etcd.
        with pytest.raises(LostLeadership):
            await mkdir(store, ROOT_INO, b"after")
        nursery.cancel_scope.cancel()
    store.close()
    other = await next_leader(client, prefix, lead, tmp_path / "b")
    assert etcd_dump(client, prefix) == dump(other)
    other.close()

    # Nothing listening at all: a clear error at start, at once.
    dead = EtcdClient([f"127.0.0.1:{free_port()}"], timeout=0.5)
    started = trio.current_time()
    with pytest.raises(EtcdError) as info:
        load(dead, f"{prefix}/meta", Database(tmp_path / "x", SUBDBS, map_size=1 << 20))
    assert info.value.code is Code.UNAVAILABLE and trio.current_time() - started < 1.0
    assert "etcd unreachable" in str(info.value) and "\n" not in str(info.value)


def names(store: MetaStore) -> set[bytes]:
    return {k[8:] for k, _ in dump(store)["dentries"]}


async def next_leader(client: EtcdClient, prefix: str, old: Leadership,
                      path: Path) -> MetaStore:
    """What a coordinator in doubt leads to: it resigns, the next leader loads etcd."""
    await election(client, prefix).resign(old)
    return open_mirrored(path, client, prefix,
                         await election(client, prefix).campaign("coord-b"))


async def test_a_lost_reply_is_in_doubt_and_the_next_leader_has_what_landed(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    """A txn etcd applied whose answer never came back: the request gets InDoubt (the
    coordinator leaves it unanswered), never a plain failure; this store writes no more; the
    next leader has it."""
    direct = etcd.client()
    e = election(direct, prefix)
    lead = await e.campaign("coord-a")
    with TcpProxy(etcd.endpoints[0]) as proxy:
        store = open_mirrored(tmp_path / "a", EtcdClient([proxy.endpoint], timeout=0.5),
                              prefix, lead)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.keep_alive, lead)
            await nursery.start(store.db.run_writer)
            proxy.mode = "drop"  # etcd applies it; the answer never comes back
            with pytest.raises(InDoubt):
                await mkdir(store, ROOT_INO, b"landed")
            assert b"landed" not in names(store)
            assert b"landed" in {k[8:] for k, _ in etcd_dump(direct, prefix)["dentries"]}
            proxy.mode = "pass"
            with pytest.raises(LostLeadership):
                await mkdir(store, ROOT_INO, b"next")
            nursery.cancel_scope.cancel()
    store.close()
    other = await next_leader(direct, prefix, lead, tmp_path / "b")
    assert b"landed" in names(other) and b"next" not in names(other)
    assert etcd_dump(direct, prefix) == dump(other)
    other.close()


async def test_a_late_copy_of_a_write_in_doubt_never_lands(etcd: EtcdCluster, prefix: str,
                                                          tmp_path: Path) -> None:
    """The txn in doubt is stuck on its way to etcd: once the leader in doubt resigned (as
    the HA coordinator does), a late copy of it is fenced off."""
    direct = etcd.client()
    e = election(direct, prefix)
    lead = await e.campaign("coord-a")
    with TcpProxy(etcd.endpoints[0]) as proxy:
        store = open_mirrored(tmp_path / "a", EtcdClient([proxy.endpoint], timeout=0.5),
                              prefix, lead)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.keep_alive, lead)
            await nursery.start(store.db.run_writer)
            proxy.mode = "hold"  # the request is stuck on the way to etcd
            with pytest.raises(InDoubt):
                await mkdir(store, ROOT_INO, b"stuck")
            proxy.mode = "pass"
            nursery.cancel_scope.cancel()
        store.close()
        other = await next_leader(direct, prefix, lead, tmp_path / "b")
        proxy.release()  # the old request reaches etcd now
        await trio.sleep(0.5)
    assert b"stuck" not in {k[8:] for k, _ in etcd_dump(direct, prefix)["dentries"]}
    assert etcd_dump(direct, prefix) == dump(other)
    other.close()


async def test_one_leader_of_two_and_the_other_takes_over(etcd: EtcdCluster,
                                                          prefix: str) -> None:
    client = etcd.client()
    won: list[tuple[str, Leadership, float]] = []

    async def candidate(address: str) -> None:
        e = election(client, prefix)
        lead = await e.campaign(address)
        won.append((address, lead, time.monotonic()))
        with pytest.raises(LostLeadership):
            await e.keep_alive(lead)

    async with trio.open_nursery() as nursery:
        for address in ("coord-a", "coord-b"):
            nursery.start_soon(candidate, address)
        await trio.sleep(TTL + 0.5)  # longer than a TTL: the leader keeps its lease alive
        assert len(won) == 1
        first, lead, _ = won[0]
        assert await election(client, prefix).current_leader() == first
        # The leader stops renewing (it died): the other leads within TTL + 1 s.
        stopped = time.monotonic()
        lead.lost = True  # its keep_alive raises at its next tick
        with trio.fail_after(TTL + 1.5):
            while len(won) < 2:
                await trio.sleep(0.05)
        second, lead2, at = won[1]
        assert second != first and at - stopped < TTL + 1
        assert lead2.create_revision > lead.create_revision
        assert await election(client, prefix).current_leader() == second
        # Resigning hands over at once.
        await election(client, prefix).resign(lead2)
        assert await election(client, prefix).current_leader() is None
        nursery.cancel_scope.cancel()


async def test_keep_alive_steps_down_the_moment_the_lease_is_gone(etcd: EtcdCluster,
                                                                  prefix: str) -> None:
    client = etcd.client()
    e = election(client, prefix)
    lead = await e.campaign("coord-a")
    client.lease_revoke(lead.lease_id)
    started = time.monotonic()
    with trio.fail_after(TTL), pytest.raises(LostLeadership):
        await e.keep_alive(lead)
    assert lead.lost and time.monotonic() - started < TTL / 2 + 0.5
    with pytest.raises(LostLeadership):
        lead.check()


async def test_three_members_writes_go_on_when_a_follower_is_killed(tmp_path: Path) -> None:
    """One of three etcd members dies, the one the coordinator talks to first but not etcd's
    leader: the next write goes to another member at once (it never left, so it is not in
    doubt) and lands, with no step-down. (etcd's leader killed: until a new one is elected a
    write may be in doubt, and the coordinator steps down and takes over again; that is
    test_ha.py::test_etcd_without_a_majority_stops_writes_then_they_resume.)"""
    with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        victim = next(i for i in range(3) if i != etcd.leader_index())
        first = etcd.endpoints[victim]
        client = etcd.client(timeout=1.0, endpoints=[first, *(e for e in etcd.endpoints
                                                              if e != first)])
        e = Election(client, b"/t3/leader", ttl=5)
        lead = await e.campaign("coord-a")
        store = open_mirrored(tmp_path / "a", client, "/t3", lead)
        mirror = store.db.mirror
        assert isinstance(mirror, EtcdMirror)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.keep_alive, lead)
            await nursery.start(store.db.run_writer)
            await mkdir(store, ROOT_INO, b"before")
            etcd.kill(victim)  # kill -9
            with trio.fail_after(5):
                await mkdir(store, ROOT_INO, b"after")
            nursery.cancel_scope.cancel()
        assert not mirror.in_doubt and not mirror.deposed
        assert {b"before", b"after"} <= names(store)
        assert etcd_dump(client, "/t3") == dump(store)
        store.close()


def test_a_cache_dir_is_emptied_but_real_lmdb_metadata_is_refused(tmp_path: Path) -> None:
    plain = MetaStore.open(tmp_path / "plain", map_size=1 << 20)  # an LMDB coordinator's
    plain.close()
    with pytest.raises(DfsError) as info:
        EtcdMirror.prepare(tmp_path / "plain")
    assert info.value.code is Code.BAD_REQUEST and "migrate" in info.value.msg
    assert (tmp_path / "plain" / "data.mdb").exists()
    EtcdMirror.prepare(tmp_path / "cache")
    (tmp_path / "cache" / "data.mdb").write_bytes(b"torn by a power cut")
    EtcdMirror.prepare(tmp_path / "cache")
    assert not (tmp_path / "cache" / "data.mdb").exists()


def test_a_dead_member_behind_a_proxy_is_skipped(etcd: EtcdCluster, prefix: str) -> None:
    """A member that accepts and then drops the connection (dead behind a proxy or load
    balancer) must not fail reads, nor a coordinator's start: the next endpoint answers."""
    with TcpProxy(f"127.0.0.1:{free_port()}") as dead:  # nothing listens behind it
        client = EtcdClient([dead.endpoint, *etcd.endpoints], timeout=2.0)
        assert client.status().version.startswith("3.")  # a read goes on to the next
        reader = EtcdClient([dead.endpoint, *etcd.endpoints], timeout=2.0)
        assert reader.get(f"{prefix}/nothing".encode()) is None
        writer = EtcdClient([dead.endpoint, *etcd.endpoints], timeout=2.0)
        with pytest.raises(EtcdError):  # a write's outcome is unknown: the caller settles it
            writer.put(f"{prefix}/k".encode(), b"v")
        writer.put(f"{prefix}/k".encode(), b"v")  # ...and it is not sent there again
        assert reader.get(f"{prefix}/k".encode()).value == b"v"  # type: ignore[union-attr]
        for c in (client, reader, writer):
            c.close()
