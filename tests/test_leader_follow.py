"""Clients, nodes and the CLI given a LIST of coordinators find the leader and follow it.

Real coordinators (in-process CoordinatorService or `dfs coordinator` processes on loopback)
next to real standbys (`Standby` served over TCP, naming the leader they are told of).
"""

from __future__ import annotations

import io
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster import COORDINATOR, Cluster
from coord_helpers import SECRET, running_coordinator, start_nodes
from standby_helpers import Leader, standby

from dfs.chunks import CHUNK_SIZE
from dfs.client import Client
from dfs.errors import Code, DfsError

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def dead_address() -> str:
    """A loopback port nobody listens on (bound by the OS, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------- in-process coordinators


async def test_a_client_given_standby_first_ends_up_at_the_leader(tmp_path: Path) -> None:
    """[standby, leader]: every call is refused by the standby, resent to the leader it names,
    and executed there once; a node given the same list registers with the leader."""
    async with running_coordinator(tmp_path / "c") as coord, \
            standby(Leader(coord.address)) as s, trio.open_nursery() as nursery:
        node_list = f"{s.address},{coord.address}"
        # start_nodes registers each through the list: the standby refuses, the leader takes it.
        coord.address, real = node_list, coord.address
        with trio.fail_after(10):
            await start_nodes(nursery, coord, 3, capacity=1 << 30)
        coord.address = real
        async with Client([s.address, real], SECRET, retry_for=2) as client:
            assert client.address == s.address
            root = await client.resolve("/")
            assert client.address == real and client.coordinator.switches == 1
            d = await client.mkdir(root.ino, b"d", DIR, 0, 0)
            with pytest.raises(DfsError) as e:  # executed once: a second one finds it there
                await client.mkdir(root.ino, b"d", DIR, 0, 0)
            assert e.value.code is Code.EEXIST
            f = await client.create(d.ino, b"f", FILE, 0, 0)
            attr = await client.write_file(f.ino, io.BytesIO(b"hello"))
            assert attr.version == 1 and len(attr.replicas) == 3
            assert s.refused >= 1 + 3  # the client's first call and the nodes' registrations
            assert await client.coordinator_info(s.address) == {
                "role": "standby", "address": s.address, "leader": real, "cluster": None}
            info = await client.coordinator_info()
            assert info["role"] == "leader" and info["leader"] == real == info["address"]
            assert info["cluster"] == coord.store.cluster_id
        nursery.cancel_scope.cancel()


async def test_a_dead_address_first_is_skipped(tmp_path: Path) -> None:
    """[dead, leader]: a connection that cannot be opened sent nothing, so even a change goes
    to the next address at once."""
    async with running_coordinator(tmp_path / "c") as coord:
        async with Client([dead_address(), coord.address], SECRET, retry_for=0) as client:
            await client.mkdir(1, b"d", DIR, 0, 0)  # a change, first of all: not a query
            assert client.address == coord.address
            assert (await client.resolve("/d")).is_dir()


async def test_an_election_is_waited_out_and_never_surfaces(tmp_path: Path) -> None:
    """A standby that knows no leader: the request waits (backoff) for one to be named, for up
    to failover_for; past it the caller sees UNAVAILABLE, never NOT_LEADER."""
    async with running_coordinator(tmp_path / "c") as coord:
        leader = Leader(None)
        async with standby(leader) as s:
            async with Client(s.address, SECRET, retry_for=0, failover_for=0.3) as client:
                with pytest.raises(DfsError) as e:
                    await client.mkdir(1, b"d", DIR, 0, 0)
                assert e.value.code is Code.UNAVAILABLE and "leads" in e.value.msg
            async with Client(s.address, SECRET, retry_for=0, failover_for=5) as client:
                async with trio.open_nursery() as nursery:

                    async def elect() -> None:
                        await trio.sleep(0.3)
                        leader.address = coord.address

                    nursery.start_soon(elect)
                    await client.mkdir(1, b"d", DIR, 0, 0)
                assert client.address == coord.address
        async with Client([s.address], SECRET) as client:
            assert client.coordinator.addresses == [s.address]


async def test_stale_standbys_naming_each_other_pause_and_give_up() -> None:
    """Two standbys each naming the other (stale views mid-election): the link hops a bounded
    number of times, backs off, and after failover_for says UNAVAILABLE; a refused request was
    never executed anywhere, so it was safe to send it around."""
    a, b = Leader(), Leader()
    async with standby(a) as sa, standby(b) as sb:
        a.address, b.address = sb.address, sa.address
        async with Client([sa.address], SECRET, retry_for=0, failover_for=0.5) as client:
            started = trio.current_time()
            with pytest.raises(DfsError) as e:
                await client.mkdir(1, b"d", DIR, 0, 0)
            assert e.value.code is Code.UNAVAILABLE
            assert 0.3 < trio.current_time() - started < 3
            assert client.coordinator.addresses == [sa.address, sb.address]  # learned one
            assert sa.refused + sb.refused < 50  # paused between rounds, no tight loop


# ---------------------------------------------------------------- a leader change, processes


async def _switch_leader(cluster: Cluster, leader: Leader, env: dict[str, str] | None) -> str:
    """The old leader is gone: the standby knows no leader while a new coordinator starts on
    another address over the same data dir; then it names the new one."""
    leader.address = None
    await trio.to_thread.run_sync(lambda: cluster.restart(
        COORDINATOR, env=env, wait=False, listen="127.0.0.1:0"))
    leader.address = cluster.coordinator
    return cluster.coordinator


async def test_a_leader_change_mid_run_is_followed(tmp_path: Path) -> None:
    """Coordinator A stops; the same data dir is served from another address; the standby
    names the new leader. A client given [A, standby] keeps working and nodes given that list
    come back up at the new leader (its writes place on them)."""
    leader = Leader()
    cluster = Cluster(tmp_path / "ha")
    async with standby(leader, cluster.secret) as s:
        cluster.standbys = [s.address]
        try:
            await trio.to_thread.run_sync(cluster.start)
            old = leader.address = cluster.coordinator
            data = os.urandom(CHUNK_SIZE + 7)
            async with Client([old, s.address], cluster.secret, retry_for=15) as client:
                f = await client.create(1, b"f", FILE, 0, 0)
                first = await client.write_file(f.ino, io.BytesIO(data))
                await trio.to_thread.run_sync(cluster.stop, COORDINATOR)
                new = await _switch_leader(cluster, leader, None)
                assert new != old
                sink = io.BytesIO()
                await client.read_file(await client.getattr(f.ino), sink)
                assert sink.getvalue() == data
                assert client.address == new
                await cluster.await_until(lambda: _all_up(client, 3), timeout=15,
                                          message="nodes up at the new leader")
                second = await client.write_file(f.ino, io.BytesIO(b"after"))
                assert second.version == first.version + 1
                await client.mkdir(1, b"d", DIR, 0, 0)
            # The CLI takes the list too, from the environment: dead old leader first.
            result = await trio.to_thread.run_sync(lambda: cluster.dfs(
                "cat", "/f", env={"DFS_COORDINATOR": f"{old},{s.address}"}))
            assert result.returncode == 0 and result.stdout == b"after", result.stderr
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)


async def _all_up(client: Client, count: int) -> bool:
    return sum(n["state"] == "up" for n in await client.node_list()) >= count


@pytest.mark.parametrize("failpoint", ["after_decision", "before_decision"])
async def test_a_commit_reply_lost_in_a_leader_switch_is_settled(
        failpoint: str, tmp_path: Path) -> None:
    """The leader dies with a commit in hand, after or before its decision; the client asks
    the new leader (found through the standby) and the write ends committed exactly once:
    decided -> that version; undecided -> aborted there and written again. if_version makes a
    duplicate impossible to miss (it would conflict with itself)."""
    leader = Leader()
    cluster = Cluster(tmp_path / "ha")
    async with standby(leader, cluster.secret) as s:
        cluster.standbys = [s.address]
        try:
            await trio.to_thread.run_sync(cluster.start)
            old = leader.address = cluster.coordinator
            async with Client([old, s.address], cluster.secret, retry_for=20) as client:
                ino = (await client.create(1, b"f", FILE, 0, 0)).ino
            env = {"DFS_FAILPOINTS": f"coordinator.{failpoint}=crash"}
            await trio.to_thread.run_sync(lambda: cluster.restart(COORDINATOR, env=env))
            leader.address = old = cluster.coordinator
            data = os.urandom(CHUNK_SIZE + 1)
            async with Client([old, s.address], cluster.secret, retry_for=20) as client, \
                    trio.open_nursery() as nursery:

                async def fail_over() -> None:
                    await cluster.await_until(lambda: not cluster.running(COORDINATOR),
                                              timeout=20)
                    await _switch_leader(cluster, leader, {})

                begun: list[int] = []  # the txids this write began, in order
                begin = client.begin

                async def counted(*args: Any, **kwargs: Any) -> Any:
                    reply = await begin(*args, **kwargs)
                    begun.append(reply[0])
                    return reply

                client.begin = counted  # type: ignore[method-assign]
                nursery.start_soon(fail_over)
                attr = await client.write_file(ino, io.BytesIO(data), base_version=0,
                                               if_version=True)
                assert attr.version == 1
                # Decided: settled as committed, not redone. Undecided: aborted, written again.
                assert begun == ([attr.blob] if failpoint == "after_decision"
                                 else [begun[0], attr.blob])
                assert client.address == leader.address != old
                sink = io.BytesIO()
                await client.read_file(await client.getattr(ino), sink)
                assert sink.getvalue() == data
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
