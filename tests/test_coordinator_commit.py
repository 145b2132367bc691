"""The coordinator's 2PC driver against real storage nodes: `dfs coordinator` and `dfs node`
processes on loopback (tests/cluster.py), driven by the library client.

What a replica holds is asked of the node itself over the wire (`stat`): STAGED, PREPARED,
COMMITTED, or gone (None). Nodes misbehave only in ways real ones do: bytes that fail their
checksum, a `--capacity` that is full, a process paused with SIGSTOP, a failpoint armed
through DFS_FAILPOINTS at start. Most tests share one cluster; `Rig.reconfigure` restarts
just the processes whose failpoints or arguments a test needs changed, and every test starts
from the plain configuration with every process running and every node up.
"""

from __future__ import annotations

import io
import os
import signal
import stat
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial

import pytest
import trio
from cluster import COORDINATOR, Cluster

from dfs.chunks import CHUNK_SIZE, file_checksum, nchunks
from dfs.client import Attr, Client
from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO

VOTE_TIMEOUT = 1.0
TXN_TIMEOUT = 3.0
COORDINATOR_ARGS = ("--node-timeout", "1.5", "--gc-grace", "1", "--vote-timeout",
                    str(VOTE_TIMEOUT), "--txn-timeout", str(TXN_TIMEOUT))
# Nodes wait long before asking OUTCOME about a PREPARED blob, and drop STAGED ones only after
# the default 300 s: whatever becomes of a blob within a test is the coordinator's doing.
NODE_ARGS = ("--heartbeat-interval", "0.2", "--outcome-after", "30")
FILE = stat.S_IFREG | 0o644
FAILPOINTS = "DFS_FAILPOINTS"
ACK_REFUSED = "failpoint node.before_commit_ack fires"


class Rig:
    """A cluster, a client of it, and questions asked of its real processes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.client = cluster.client()
        self._ids: dict[str, int] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------ configuration

    async def reconfigure(self, env: Mapping[str, Mapping[str, str]] | None = None,
                          args: Mapping[str, Sequence[str]] | None = None) -> None:
        """Restart the processes whose environment or extra arguments differ from `env` /
        `args` (processes not named get the plain configuration); then a fresh client."""
        await trio.to_thread.run_sync(configure, self.cluster, env or {}, args or {})
        await self.client.aclose()
        self.client = self.cluster.client()

    # ------------------------------------------------------------ nodes

    async def ids(self) -> dict[str, int]:
        """Node name -> node id, from the coordinator's node table."""
        if not self._ids:
            by_address = {n["address"]: n["id"] for n in (await self.client.status())["nodes"]}
            self._ids = {name: by_address[self.cluster.procs[name].address]
                         for name in self.cluster.node_names}
        return self._ids

    async def name(self, node_id: int) -> str:
        return next(n for n, i in (await self.ids()).items() if i == node_id)

    async def states(self, blob: int, names: Sequence[str] | None = None
                     ) -> dict[str, str | None]:
        """Each node's state of `blob` (STAGED/PREPARED/COMMITTED, or None: not there)."""
        out: dict[str, str | None] = {}
        for name in names or self.cluster.node_names:
            peer = self.client.peers[self.cluster.procs[name].address]
            info = (await peer.call("stat", blobs=[blob], retry_for=5))["blobs"][blob]
            out[name] = info["state"] if info else None
        return out

    async def blob_info(self, blob: int) -> dict[str, dict | None]:
        """Each node's `stat` record of `blob` (None: not there)."""
        out = {}
        for name in self.cluster.node_names:
            peer = self.client.peers[self.cluster.procs[name].address]
            out[name] = (await peer.call("stat", blobs=[blob], retry_for=5))["blobs"][blob]
        return out

    async def wait_states(self, blob: int, want: str | None, names: Sequence[str] | None = None,
                          timeout: float = 10.0) -> None:
        """Until every node named (default all) has `blob` in state `want` (None: gone)."""

        async def reached() -> bool:
            return set((await self.states(blob, names)).values()) == {want}

        await self.cluster.await_until(reached, timeout, interval=0.05,
                                       message=f"blob {blob} {want or 'gone'} on {names or 'all'}")

    def refused_acks(self, name: str) -> int:
        """How often this incarnation of node `name` refused a COMMIT ack (its log says)."""
        return self.cluster.log(name, lines=100_000).count(ACK_REFUSED)

    # ------------------------------------------------------------ coordinator

    async def new_file(self, name: str) -> int:
        return (await self.client.create(ROOT_INO, name.encode(), FILE, 0, 0)).ino

    async def open_txn(self, txid: int) -> dict | None:
        return next((t for t in await self.client.txn_list() if t["txid"] == txid), None)

    async def wait_ended(self, txid: int, timeout: float = 10.0) -> None:
        """Until the coordinator no longer owes `txid` anything (every replica acked)."""

        async def ended() -> bool:
            return await self.open_txn(txid) is None

        await self.cluster.await_until(ended, timeout, message=f"transaction {txid} ended")

    async def read(self, attr: Attr) -> bytes:
        sink = io.BytesIO()
        await self.client.read_file(attr, sink)
        return sink.getvalue()


def configure(cluster: Cluster, env: Mapping[str, Mapping[str, str]],
              args: Mapping[str, Sequence[str]]) -> None:
    """Bring every process to the wanted environment and extra arguments, restarting only those
    that differ or are not running (nodes first, the coordinator last), then wait for the nodes."""
    names = [*cluster.node_names, COORDINATOR]
    for name in names:
        cluster.kill(name, signal.SIGCONT)  # a test paused it and failed before resuming it
    changed = False
    for name in names:
        want_env, want_args = dict(env.get(name, {})), list(args.get(name, ()))
        if (not cluster.running(name) or cluster.env.get(name, {}) != want_env
                or cluster.extra_args.get(name, []) != want_args):
            cluster.restart(name, env=want_env, args=want_args, wait=False)
            changed = True
    if changed:
        cluster.wait_nodes_up()


async def stage(client: Client, txid: int, replicas: Sequence[tuple[int, str]],
                data: bytes) -> tuple[int, bytes, int]:
    """Send every chunk of `data` to every replica, as a writer does; (size, checksum, nchunks)
    for the COMMIT."""
    for _, address in replicas:
        for index in range(nchunks(len(data))):
            chunk = data[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]
            await client.peers[address].call("stage", txid=txid, index=index, data=chunk)
    return len(data), file_checksum(data), nchunks(len(data))


async def fails(code: Code, fn, *args, **kwargs) -> DfsError:
    with pytest.raises(DfsError) as info:
        await fn(*args, **kwargs)
    assert info.value.code is code, info.value
    return info.value


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator and three nodes (R=3) for the tests that leave them healthy."""
    cluster = Cluster(tmp_path_factory.mktemp("commit-cluster"),
                      coordinator_args=COORDINATOR_ARGS, node_args=NODE_ARGS)
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@pytest.fixture
async def rig(module_cluster: Cluster) -> AsyncIterator[Rig]:
    """The shared cluster in its plain configuration, every process running, every node up."""
    await trio.to_thread.run_sync(configure, module_cluster, {}, {})
    r = Rig(module_cluster)
    try:
        nodes = (await r.client.status())["nodes"]
        if any(n["state"] != "up" for n in nodes):  # one was paused or restarted last test
            await trio.to_thread.run_sync(module_cluster.wait_nodes_up)
        yield r
    finally:
        await r.aclose()


# ---------------------------------------------------------------- the commit


async def test_commit_prepares_everywhere_decides_then_delivers(rig: Rig) -> None:
    c = rig.client
    ids = await rig.ids()
    ino = await rig.new_file("decide")
    txid, replicas = await c.begin(ino, base_version=0, if_version=True)
    assert sorted(i for i, _ in replicas) == sorted(ids.values())
    assert {a for _, a in replicas} == {rig.cluster.procs[n].address for n in ids}
    assert await c.outcome(txid) == "inflight"
    data = os.urandom(2 * CHUNK_SIZE + 100)
    size, checksum, count = await stage(c, txid, replicas, data)
    assert set((await rig.states(txid)).values()) == {"STAGED"}

    attr = await c.commit(txid, size, checksum, count, mtime_ns=77)
    # The reply comes at the decision, and the decision only once every replica forced the
    # bytes (rule 1): none of them may still be merely STAGED.
    assert set((await rig.states(txid)).values()) <= {"PREPARED", "COMMITTED"}
    assert (attr.version, attr.blob, attr.size) == (1, txid, size)
    assert attr.checksum == checksum and attr.mtime_ns == 77
    assert sorted(attr.replicas) == sorted(ids.values())
    assert await c.outcome(txid) == "committed"

    await rig.wait_ended(txid)  # every replica acked the COMMIT
    for name, info in (await rig.blob_info(txid)).items():
        assert info is not None, name
        assert (info["state"], info["size"], info["checksum"]) == ("COMMITTED", size, checksum)
    assert await rig.read(attr) == data
    again = await c.commit(txid, size, checksum, count)
    assert again.version == 1 and again.blob == txid, "a retried COMMIT gets the same answer"


async def test_a_no_vote_aborts_everywhere(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("no-vote")
    txid, replicas = await c.begin(ino)
    data = os.urandom(1000)
    bad_id, bad_address = replicas[1]
    await stage(c, txid, [r for r in replicas if r[0] != bad_id], data)
    await stage(c, txid, [(bad_id, bad_address)], bytes([data[0] ^ 1]) + data[1:])

    e = await fails(Code.UNAVAILABLE, c.commit, txid, len(data), file_checksum(data), 1)
    assert "voted no" in e.msg and "checksum" in e.msg.lower()
    assert e.details["failed"] == [bad_id], "so the retry can exclude it"
    # The ABORT reached every replica: the blob is gone everywhere (the nodes' own timeout
    # for staged data is 300 s), and an ABORT never drops a COMMITTED blob, so none committed.
    await rig.wait_states(txid, None)
    assert await c.outcome(txid) == "aborted"
    assert (await c.getattr(ino)).version == 0


async def test_enospc_and_vote_timeout(rig: Rig) -> None:
    # A full node: node-3 may hold no more than it already does.
    await rig.reconfigure(args={"node-3": ["--capacity", "65536"]})
    c = rig.client
    ids = await rig.ids()
    ino = await rig.new_file("full")
    txid, replicas = await c.begin(ino)
    data = os.urandom(CHUNK_SIZE)
    await stage(c, txid, [r for r in replicas if r[0] != ids["node-3"]], data)
    await fails(Code.ENOSPC, stage, c, txid, [(ids["node-3"], rig.cluster.procs["node-3"].address)],
                data)
    await c.abort(txid)  # what a writer does when a replica refuses
    await rig.wait_states(txid, None)
    assert await c.outcome(txid) == "aborted"
    # The library client end to end: the error is ENOSPC, and nothing changed.
    await fails(Code.ENOSPC, c.write_file, ino, io.BytesIO(data))
    assert (await c.getattr(ino)).version == 0

    # A replica that does not vote in time: paused after staging, before the PREPARE.
    await rig.reconfigure()
    c = rig.client
    txid, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, txid, replicas, b"late vote")
    slow_id = replicas[0][0]
    slow = await rig.name(slow_id)
    rig.cluster.kill(slow, signal.SIGSTOP)
    try:
        started = trio.current_time()
        with trio.fail_after(VOTE_TIMEOUT + 2):
            e = await fails(Code.UNAVAILABLE, c.commit, txid, size, checksum, count)
        assert trio.current_time() - started >= VOTE_TIMEOUT * 0.9, f"it waited for the vote: {e}"
        assert e.details.get("failed") == [slow_id], e
    finally:
        rig.cluster.kill(slow, signal.SIGCONT)
    assert (await c.getattr(ino)).version == 0
    assert await c.outcome(txid) == "aborted"
    # The late voter prepares once resumed; the ABORT, sent while it was paused, drops it.
    await rig.wait_states(txid, None)


async def test_if_version_conflict_fails_before_any_prepare(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("cas")
    stale, replicas = await c.begin(ino, base_version=0, if_version=True)
    claimed = b"the stale writer's content"
    # The replicas hold other bytes than the COMMIT will claim: a PREPARE would be voted NO
    # (CHECKSUM) and answered UNAVAILABLE, so CONFLICT proves no PREPARE round happened.
    await stage(c, stale, replicas, claimed.upper())
    await c.write_file(ino, io.BytesIO(b"someone else's version 1"))
    await fails(Code.CONFLICT, c.commit, stale, len(claimed), file_checksum(claimed), 1)
    assert set((await rig.states(stale)).values()) <= {"STAGED", None}
    await rig.wait_states(stale, None)  # ABORT went to every replica
    assert await c.outcome(stale) == "aborted"
    assert (await c.getattr(ino)).version == 1


async def test_superseded_blob_is_deleted_after_the_grace_period(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("gc")
    first = await c.write_file(ino, io.BytesIO(b"one"))
    second = await c.write_file(ino, io.BytesIO(b"two"))
    await rig.wait_states(first.blob, None)
    assert set((await rig.states(second.blob)).values()) == {"COMMITTED"}
    assert await rig.read(await c.getattr(ino)) == b"two"

    async def gc_pending() -> int:
        return (await c.status())["gc_pending"]

    async def drained() -> bool:
        return await gc_pending() == 0

    await rig.cluster.await_until(drained, message="GC queue empty")
    await c.unlink(ROOT_INO, b"gc")
    assert await gc_pending() == 3, "the last version's three replicas wait out the grace"
    await rig.wait_states(second.blob, None)


async def test_commit_is_redelivered_until_acked(rig: Rig) -> None:
    await rig.reconfigure(env={"node-3": {FAILPOINTS: "node.before_commit_ack=error"}})
    c = rig.client
    ids = await rig.ids()
    ino = await rig.new_file("redeliver")
    attr = await c.write_file(ino, io.BytesIO(b"acked at last"))
    txn = await rig.open_txn(attr.blob)
    assert txn is not None and txn["state"] == "committed"
    await rig.cluster.await_until(lambda: rig.refused_acks("node-3") >= 3, timeout=10,
                                  message="COMMIT sent to node-3 three times")
    txn = await rig.open_txn(attr.blob)
    assert txn is not None, "not ended while a replica has not acked"
    assert sorted(txn["acked"]) == sorted([ids["node-1"], ids["node-2"]])
    # node-3 forced COMMITTED before it refused the ack.
    assert set((await rig.states(attr.blob)).values()) == {"COMMITTED"}

    await rig.reconfigure()  # node-3 acks again
    await rig.wait_ended(attr.blob)
    assert await rig.read(attr) == b"acked at last"


async def test_restart_resends_owed_commits(rig: Rig) -> None:
    await rig.reconfigure(env={"node-1": {FAILPOINTS: "node.before_commit_ack=error"}})
    ids = await rig.ids()
    ino = await rig.new_file("owed")
    blob = (await rig.client.write_file(ino, io.BytesIO(b"owed"))).blob
    await rig.cluster.await_until(lambda: rig.refused_acks("node-1") >= 1,
                                  message="node-1 refused the COMMIT ack")
    assert await rig.open_txn(blob) is not None

    # The coordinator crashes and comes back: the decision record says what it still owes.
    await trio.to_thread.run_sync(rig.cluster.kill, COORDINATOR)
    refused_before = rig.refused_acks("node-1")
    await rig.reconfigure(env={"node-1": {FAILPOINTS: "node.before_commit_ack=error"}})
    c = rig.client
    owed = [t for t in await c.txn_list() if t["state"] == "committed"]
    assert [t["txid"] for t in owed] == [blob]
    assert ids["node-1"] not in owed[0]["acked"]
    await rig.cluster.await_until(lambda: rig.refused_acks("node-1") > refused_before,
                                  message="the restarted coordinator re-sent the COMMIT")

    await rig.reconfigure()  # node-1 acks again
    c = rig.client
    await rig.wait_ended(blob)
    assert await c.outcome(blob) == "committed"
    assert set((await rig.states(blob)).values()) == {"COMMITTED"}
    fresh, _ = await c.begin(await rig.new_file("owed-2"))
    assert fresh > blob, "txids are not reused after a restart"
    await c.abort(fresh)


async def test_client_abort_and_silent_client_expiry(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("expire")
    txid, replicas = await c.begin(ino)
    await stage(c, txid, replicas, b"abandoned")
    await c.abort(txid)
    assert await c.outcome(txid) == "aborted"
    await rig.wait_states(txid, None)

    silent, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, silent, replicas, b"and then silence")
    began = trio.current_time()
    assert await c.outcome(silent) == "inflight"
    await rig.wait_states(silent, None, timeout=2 * TXN_TIMEOUT + 3)
    assert trio.current_time() - began >= TXN_TIMEOUT * 0.9, "aborted only after the timeout"
    assert await c.outcome(silent) == "aborted"
    await fails(Code.UNAVAILABLE, c.commit, silent, size, checksum, count)
    assert (await c.getattr(ino)).version == 0


async def test_placement_skips_down_nodes_and_honours_exclude(cluster_factory) -> None:
    cluster = await trio.to_thread.run_sync(partial(
        cluster_factory, nodes=4, coordinator_args=COORDINATOR_ARGS, node_args=NODE_ARGS))
    r = Rig(cluster)
    try:
        c = r.client
        ids = await r.ids()
        ino = await r.new_file("placed")
        txid, replicas = await c.begin(ino, exclude=[ids["node-1"]])
        assert sorted(i for i, _ in replicas) == sorted(ids[n] for n in
                                                        ("node-2", "node-3", "node-4"))
        await c.abort(txid)

        await trio.to_thread.run_sync(cluster.kill, "node-4")

        async def node_4_down() -> bool:
            nodes = {n["id"]: n["state"] for n in await c.node_list()}
            return nodes[ids["node-4"]] == "down"

        await cluster.await_until(node_4_down, message="node-4 down")
        live = sorted(ids[n] for n in ("node-1", "node-2", "node-3"))
        attr = await c.write_file(ino, io.BytesIO(b"on the live three"))
        assert sorted(attr.replicas) == live
        assert set((await r.states(attr.blob, ["node-1", "node-2", "node-3"])).values()
                   ) <= {"PREPARED", "COMMITTED"}
        e = await fails(Code.UNAVAILABLE, c.begin, ino, exclude=[ids["node-2"]])
        assert "need 3 live nodes, have 2" in e.msg
    finally:
        await r.aclose()


async def test_concurrent_commits_all_land(rig: Rig) -> None:
    c = rig.client
    contents = {await rig.new_file(f"many-{i}"): os.urandom(100 + i) for i in range(20)}
    results: list[Attr] = []

    async def one(ino: int) -> None:
        results.append(await c.write_file(ino, io.BytesIO(contents[ino])))

    async with trio.open_nursery() as nursery:
        for ino in contents:
            nursery.start_soon(one, ino)
    assert sorted(a.ino for a in results) == sorted(contents)
    assert {a.version for a in results} == {1}
    assert len({a.blob for a in results}) == 20
    for attr in results:
        await rig.wait_states(attr.blob, "COMMITTED")
        assert await rig.read(attr) == contents[attr.ino]


async def test_concurrent_commits_share_commit_requests(rig: Rig) -> None:
    """COMMITs of concurrent writes reach a node batched (docs/design.md §5): it serves fewer
    commit requests than it is owed (txid, node) COMMITs, and every write still lands, at one
    whole version, COMMITTED on every replica."""
    c = rig.client

    async def counters() -> dict[str, int]:
        out = {}
        for name in rig.cluster.node_names:
            peer = c.peers[rig.cluster.procs[name].address]
            out[name] = (await peer.call("node_info", retry_for=5))["commit_requests"]
        return out

    contents = {await rig.new_file(f"batched-{i}"): os.urandom(200 + i) for i in range(40)}
    before = await counters()
    results: list[Attr] = []

    async def one(ino: int) -> None:
        results.append(await c.write_file(ino, io.BytesIO(contents[ino])))

    async with trio.open_nursery() as nursery:
        for ino in contents:
            nursery.start_soon(one, ino)
    for attr in results:
        await rig.wait_ended(attr.blob)  # every replica acked
    after = await counters()
    names = {i: n for n, i in (await rig.ids()).items()}
    owed = {name: 0 for name in names.values()}
    for attr in results:
        for node_id in attr.replicas:
            owed[names[node_id]] += 1
    requests = {name: after[name] - before[name] for name in after}
    assert sum(requests.values()) < sum(owed.values()), (requests, owed)
    assert {a.version for a in results} == {1} and len(results) == 40
    for attr in results:
        assert set((await rig.states(attr.blob)).values()) == {"COMMITTED"}
        assert await rig.read(attr) == contents[attr.ino]


# ---------------------------------------------------------------- coordinator failpoints


async def test_failpoint_before_decision_aborts(rig: Rig) -> None:
    await rig.reconfigure(env={COORDINATOR: {FAILPOINTS: "coordinator.before_decision=error"}})
    c = rig.client
    ino = await rig.new_file("before-decision")
    txid, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, txid, replicas, b"never decided")
    e = await fails(Code.INTERNAL, c.commit, txid, size, checksum, count)
    # That failpoint sits after the last YES vote: every replica had prepared.
    assert "coordinator.before_decision" in e.msg
    assert await c.outcome(txid) == "aborted"
    await rig.wait_states(txid, None)  # the PREPARED blobs were dropped on ABORT
    assert (await c.getattr(ino)).version == 0


async def test_failpoint_after_decision_keeps_the_write(rig: Rig) -> None:
    await rig.reconfigure(env={COORDINATOR: {FAILPOINTS: "coordinator.after_decision=error"}})
    c = rig.client
    ino = await rig.new_file("after-decision")
    txid, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, txid, replicas, b"decided")
    e = await fails(Code.INTERNAL, c.commit, txid, size, checksum, count)
    assert "coordinator.after_decision" in e.msg
    assert await c.outcome(txid) == "committed"
    attr = await c.getattr(ino)
    assert (attr.blob, attr.version) == (txid, 1)
    await rig.wait_ended(txid)
    assert set((await rig.states(txid)).values()) == {"COMMITTED"}
    assert await rig.read(attr) == b"decided"


async def test_failpoint_mid_commit_stops_after_the_first_replica(rig: Rig) -> None:
    await rig.reconfigure(env={COORDINATOR: {FAILPOINTS: "coordinator.mid_commit=delay:1000"}})
    c = rig.client
    ino = await rig.new_file("mid-commit")
    txid, replicas = await c.begin(ino)
    first = await rig.name(replicas[0][0])
    rest = [await rig.name(i) for i, _ in replicas[1:]]
    size, checksum, count = await stage(c, txid, replicas, b"one at a time")
    await c.commit(txid, size, checksum, count)
    await rig.wait_states(txid, "COMMITTED", [first], timeout=0.8)
    assert await rig.states(txid, rest) == {name: "PREPARED" for name in rest}
    await rig.wait_ended(txid)
    assert set((await rig.states(txid)).values()) == {"COMMITTED"}


# ---------------------------------------------------------------- the namespace and bad input


async def test_commit_to_a_file_deleted_meanwhile_is_enoent(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("deleted")
    txid, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, txid, replicas, b"x")
    await c.unlink(ROOT_INO, b"deleted")
    await fails(Code.ENOENT, c.commit, txid, size, checksum, count)
    # The transaction is gone: even a malformed COMMIT is now just "unknown".
    await fails(Code.UNAVAILABLE, c.commit, txid, size, checksum, 2)
    await rig.wait_states(txid, None)


async def test_bad_commit_fields_leave_the_transaction_open(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("bad-fields")
    txid, replicas = await c.begin(ino)
    size, checksum, count = await stage(c, txid, replicas, b"y")
    await fails(Code.BAD_REQUEST, c.commit, txid, size, b"short", count)
    await fails(Code.BAD_REQUEST, c.commit, txid, size, checksum, 3)
    assert await c.outcome(txid) == "inflight"
    assert set((await rig.states(txid)).values()) == {"STAGED"}, "no PREPARE went out"
    attr = await c.commit(txid, size, checksum, count)
    assert attr.version == 1
    await rig.wait_ended(txid)
    assert set((await rig.states(txid)).values()) == {"COMMITTED"}


# ---------------------------------------------------------------- stage and vote in one message


async def stage_and_vote(client: Client, txid: int, replicas: Sequence[tuple[int, str]],
                         data: bytes) -> tuple[int, bytes, int]:
    """A one-chunk STAGE carrying the prepare fields (docs/design.md §5, rule 2): the vote."""
    fields = dict(size=len(data), checksum=file_checksum(data), nchunks=1)
    for _, address in replicas:
        await client.peers[address].call("stage", txid=txid, index=0, data=data, **fields)
    return fields["size"], fields["checksum"], fields["nchunks"]


async def test_replicas_that_voted_in_their_stage_commit_without_prepare(rig: Rig) -> None:
    c = rig.client
    ino = await rig.new_file("voted")
    txid, replicas = await c.begin(ino)
    data = os.urandom(4000)
    size, checksum, count = await stage_and_vote(c, txid, replicas[:2], data)
    await stage(c, txid, replicas[2:], data)
    names = [await rig.name(i) for i, _ in replicas]
    assert await rig.states(txid, names) == dict(zip(names, ["PREPARED", "PREPARED", "STAGED"], strict=True))
    assert await c.outcome(txid) == "inflight"
    await fails(Code.BAD_REQUEST, c.coordinator.call, "commit", txid=txid, size=size,
                checksum=checksum, nchunks=count, voted=["node-1"])
    # The two voters and a stray id; the third replica is sent PREPARE.
    voted = [replicas[0][0], replicas[1][0], 999]
    attr = await c.commit(txid, size, checksum, count, voted=voted)
    assert (attr.version, attr.blob) == (1, txid)
    await rig.wait_ended(txid)
    assert set((await rig.states(txid)).values()) == {"COMMITTED"}
    assert await rig.read(attr) == data
    # The library's own one-chunk writes take this path end to end.
    attr = await c.write_file(ino, io.BytesIO(b"small"), base_version=1, if_version=True)
    assert attr.version == 2 and await rig.read(attr) == b"small"


async def test_a_copy_prepared_by_its_stage_goes_when_its_client_goes_silent(rig: Rig) -> None:
    """The client voted its replicas in their STAGE and died before COMMIT: the copies are
    PREPARED, and presumed abort still removes them (the expiry's ABORT)."""
    c = rig.client
    ino = await rig.new_file("silent-voted")
    txid, replicas = await c.begin(ino)
    await stage_and_vote(c, txid, replicas, b"voted, then silence")
    assert set((await rig.states(txid)).values()) == {"PREPARED"}
    assert await c.outcome(txid) == "inflight"
    await rig.wait_states(txid, None, timeout=2 * TXN_TIMEOUT + 3)
    assert await c.outcome(txid) == "aborted"
    assert (await c.getattr(ino)).version == 0
