"""A standby's warm cache (dfs/etcd/follower.py, dfs/etcd/watch.py) against real etcd.

What a failover relies on: the cache a standby loaded and then kept in step by the watch is,
once it has seen its own election, exactly the metadata a fresh load would read, deletes and
renames included; and the watch tells a compacted start revision and a silent stream apart.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
import trio
from etcd_harness import EtcdCluster
from etcd_meta_helpers import etcd_dump
from meta_helpers import GRACE, dump

from dfs.etcd.client import Compacted, EtcdClient, EtcdError, prefix_end
from dfs.etcd.election import Election
from dfs.etcd.follower import Follower
from dfs.etcd.mirror import EtcdMirror
from dfs.etcd.watch import Event, Idle, watch
from dfs.meta import ROOT_INO, SUBDBS, MetaStore

NOW = 1_000 * 10**9
DIR = stat.S_IFDIR | 0o755


async def test_a_followed_cache_equals_etcd_at_the_next_election(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    client = etcd.client()
    key = f"{prefix}/leader".encode()
    lead = await Election(client, key, ttl=2).campaign("coord-a")
    store = MetaStore.open(tmp_path / "leader", gc_grace_ns=GRACE, map_size=1 << 24,
                           mirror=EtcdMirror(client, f"{prefix}/meta", lead))
    follower = Follower(client, prefix, f"{prefix}/meta", tmp_path / "standby", SUBDBS,
                        map_size=1 << 24)
    apply = follower._apply

    async def lagging(events: list[Event]) -> None:
        """A standby on a loaded machine: each batch lands late, so the election is seen
        well after it happened and `caught_up` has to wait for it."""
        await trio.sleep(0.2)
        await apply(events)

    follower._apply = lagging  # type: ignore[method-assign]

    async def mkdir(parent: int, name: bytes) -> dict:
        return await store.db.write(
            lambda t: store.namespace.mkdir(t, parent, name, DIR, 0, 0, NOW))

    async with trio.open_nursery() as nursery:
        await nursery.start(store.db.run_writer)
        docs = await mkdir(ROOT_INO, b"docs")  # before the standby loads
        nursery.start_soon(follower.run)
        with trio.fail_after(10):
            while not follower.loaded:
                await trio.sleep(0.01)
        loaded_at = follower.revision
        async with trio.open_nursery() as group:  # after: only the watch brings these
            for i in range(30):
                group.start_soon(mkdir, docs["ino"], b"d%d" % i)
        await store.db.write(lambda t: store.namespace.rename(
            t, docs["ino"], b"d0", ROOT_INO, b"moved", 0, NOW))
        for i in (1, 2, 3):
            await store.db.write(lambda t, i=i: store.namespace.rmdir(
                t, docs["ino"], b"d%d" % i, NOW))
        await Election(client, key, ttl=2).resign(lead)
        nxt = await Election(client, key, ttl=2).campaign("coord-b")
        assert await follower.caught_up(nxt.create_revision, 10.0)
        assert follower.revision >= nxt.create_revision > loaded_at
        await follower.stop()
        nursery.cancel_scope.cancel()
    follower.close()
    assert follower.applied > 30  # the changes came by the watch, not by the load
    # The standby's cache, opened as it is by the next leader, is etcd's metadata exactly.
    other = MetaStore.open(tmp_path / "standby", gc_grace_ns=GRACE, map_size=1 << 24,
                           mirror=EtcdMirror(client, f"{prefix}/meta", nxt), loaded=True)
    expected = etcd_dump(client, prefix)
    assert dump(other) == expected == dump(store)
    names = {k[8:] for k, _ in expected["dentries"]}
    assert {b"docs", b"moved", b"d4", b"d29"} <= names
    assert not {b"d1", b"d2", b"d3"} & names
    assert other.cluster_id == store.cluster_id
    store.close()
    other.close()


async def test_a_watch_from_a_compacted_revision_says_so(etcd: EtcdCluster,
                                                         prefix: str) -> None:
    client = etcd.client()
    key = f"{prefix}/k".encode()
    first = client.put(key, b"1")
    last = client.put(key, b"2")
    client.compact(last)

    async def apply(events: list[Event]) -> None:
        raise AssertionError(f"events from a compacted revision: {events}")

    with pytest.raises(Compacted):
        await watch(client.endpoints, key, prefix_end(key), first, apply)


async def test_a_watch_brings_puts_and_deletes_in_order_then_goes_idle(
        etcd: EtcdCluster, prefix: str) -> None:
    client = etcd.client()
    root = f"{prefix}/".encode()
    start = client.put(root + b"a", b"1")
    client.put(root + b"b", b"2")
    client.delete_range(root + b"a")
    seen: list[Event] = []

    async def apply(events: list[Event]) -> None:
        seen.extend(events)

    with pytest.raises(Idle):
        await watch(client.endpoints, root, prefix_end(root), start, apply, idle=0.5)
    assert [(e.key[len(root):], e.value) for e in seen] == [
        (b"a", b"1"), (b"b", b"2"), (b"a", None)]
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)


async def test_the_watch_and_the_writes_go_over_tls_with_both_sides_verified(
        tmp_path: Path) -> None:
    """etcd run with TLS on its client and peer links and --client-cert-auth (as
    `dfs local up --ha --tls` runs it): a leader's writes and a standby's watch both go
    over TLS; a plain client and a TLS client without a certificate get nothing."""
    from dfs import tls_local
    from dfs.cli.etcd_members import MemberTls

    certs = tmp_path / "tls"
    ca = tls_local.make_ca(certs)
    member = MemberTls(*tls_local.make_cert(certs, "etcd", ["127.0.0.1", "localhost"]), ca)
    with EtcdCluster(tmp_path / "etcd", tls=member) as etcd:
        client = etcd.client()  # https, presenting a certificate of the CA
        assert all(e.startswith("https://") for e in client.endpoints)
        with pytest.raises(EtcdError):
            EtcdClient([etcd.endpoints[0]], timeout=1.0).range(b"/")  # plain http
        no_cert = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(EtcdError):
            EtcdClient([etcd.endpoints[0]], timeout=1.0, tls=no_cert).range(b"/")
        lead = await Election(client, b"/dfs/leader", ttl=2).campaign("coord-a")
        store = MetaStore.open(tmp_path / "leader", gc_grace_ns=GRACE, map_size=1 << 24,
                               mirror=EtcdMirror(client, "/dfs/meta", lead))
        follower = Follower(client, "/dfs", "/dfs/meta", tmp_path / "standby", SUBDBS,
                            map_size=1 << 24)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.db.run_writer)
            nursery.start_soon(follower.run)
            with trio.fail_after(10):
                while not follower.loaded:
                    await trio.sleep(0.01)
            for i in range(5):
                await store.db.write(lambda t, i=i: store.namespace.mkdir(
                    t, ROOT_INO, b"d%d" % i, DIR, 0, 0, NOW))
            await Election(client, b"/dfs/leader", ttl=2).resign(lead)
            nxt = await Election(client, b"/dfs/leader", ttl=2).campaign("coord-b")
            assert await follower.caught_up(nxt.create_revision, 10.0)
            await follower.stop()
            nursery.cancel_scope.cancel()
        follower.close()
        assert follower.applied >= 5
        other = MetaStore.open(tmp_path / "standby", gc_grace_ns=GRACE, map_size=1 << 24,
                               mirror=EtcdMirror(client, "/dfs/meta", nxt), loaded=True)
        assert dump(other) == dump(store) == etcd_dump(client, "/dfs")
        store.close()
        other.close()


async def test_a_member_that_takes_the_watch_and_goes_silent_is_passed_over(
        etcd: EtcdCluster, prefix: str, tmp_path: Path) -> None:
    """The standby's first member accepts connections but holds every request (paused,
    partitioned): its watch goes idle and the next one is watched instead, so the cache
    still catches up with an election."""
    from etcd_harness import TcpProxy

    silent = TcpProxy(etcd.endpoints[0])
    silent.mode = "hold"
    try:
        client = EtcdClient([silent.endpoint, etcd.endpoints[0]], timeout=2.0)
        key = f"{prefix}/leader".encode()
        follower = Follower(client, prefix, f"{prefix}/meta", tmp_path / "standby", SUBDBS,
                            map_size=1 << 24)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run)
            with trio.fail_after(15):
                while not follower.loaded:  # the election below comes by the watch alone
                    await trio.sleep(0.01)
            direct = etcd.client()
            lead = await Election(direct, key, ttl=2).campaign("coord-a")
            assert follower.revision < lead.create_revision
            with trio.fail_after(15):
                assert await follower.caught_up(lead.create_revision, 10.0)
            await follower.stop()
            nursery.cancel_scope.cancel()
        follower.close()
    finally:
        silent.mode = "pass"
        silent.stop()
