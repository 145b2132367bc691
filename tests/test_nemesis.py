"""The nemesis (issues 5, 8, 10 and 17): its checker on made-up histories, the judges of the
mount load's versions, its judge of the first `dfs check` after healing, its proxy, and real
campaigns (one with the metadata on etcd and two coordinators, `--ha`; one of the mount's own
faults under writers of every shape).

The checker and judge tests feed histories and findings with a known flaw and expect exactly
that violation, so a campaign that reports 0 violations means something. The short campaigns
run in the default suite (real processes, real mounts when FUSE is usable, about a minute
each); the long ones are `@pytest.mark.slow` (scripts/nemesis runs the same thing from the
command line).
"""

from __future__ import annotations

import functools
import io
import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from etcd_harness import require_etcd
from mount_harness import fuse_unavailable, require_fuse

from dfs.nemesis.campaign import Options, Summary, campaign
from dfs.nemesis.checker import check_history
from dfs.nemesis.cluster import NemesisCluster
from dfs.nemesis.faults import KINDS
from dfs.nemesis.final import replica_problem
from dfs.nemesis.finished import Read, Target, Version, judge_reads, judge_versions, key, repeated
from dfs.nemesis.ha_faults import HA_KINDS
from dfs.nemesis.history import FAIL, INFO, OK, History, Op, content_for, digest
from dfs.nemesis.judge import Ledger, attribute
from dfs.nemesis.mount_ends import MountEnds, certain
from dfs.nemesis.mount_load import AFTER_CLOSE, CLOSE_UNREPORTED
from dfs.nemesis.mount_writers import begun_by, finished_by, make
from dfs.nemesis.proxy import BLACKHOLE, REFUSE, Proxies, Proxy
from dfs.rpc import frame_keys
from dfs.wire import TAG_BYTES, FrameMac, decode, encode

# ---------------------------------------------------------------- the checker


class Script:
    """Build a history by hand: writes and reads with explicit times."""

    def __init__(self, tmp_path: Path) -> None:
        self.history = History(tmp_path / "h.jsonl", seed=7)
        self.data: dict[int, bytes] = {}

    def write(self, t0: float, t1: float | None, outcome: str, *, file: str = "f",
              size: int = 100, version: int | None = None, via: str = "lib",
              **fields: object) -> Op:
        content = content_for(7, self.history.peek_id(), file, size)
        op = self.history.invoke("w", "write", file, via, size=len(content),
                                 digest=digest(content), **fields)
        self.data[op.id] = content
        self.history.complete(op, outcome, version=version, version_known=version is not None)
        op.invoke, op.complete = t0, t1
        return op

    def read(self, t0: float, t1: float, data: bytes, *, file: str = "f",
             version: int | None = None, via: str = "lib") -> Op:
        op = self.history.invoke("r", "read", file, via)
        self.history.attribute(op, data)
        self.history.complete(op, OK, version=version)
        op.invoke, op.complete = t0, t1
        return op

    def kinds(self) -> list[str]:
        return sorted(v.kind for v in check_history(self.history))


def test_a_clean_history_has_no_violations(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, OK, version=1)
    s.read(0.5, 0.6, b"", version=0)  # concurrent with the write: old value is fine
    b = s.write(2, None, INFO)  # unknown: may show up any time later, or never
    s.read(3, 4, s.data[a.id], version=1)
    s.read(5, 6, s.data[b.id], version=2)
    assert s.kinds() == []


def test_a_read_of_two_versions_is_a_mix(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, OK, size=3000, version=1)
    b = s.write(2, 3, OK, size=3000, version=2)
    mixed = s.data[a.id][:1500] + s.data[b.id][1500:]
    s.read(4, 5, mixed, version=2)
    s.read(4, 5, b"garbage", version=2)
    assert s.kinds() == ["mixed-read", "mixed-read"]


def test_a_failed_write_must_never_be_seen(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, FAIL, error="CONFLICT")
    s.read(2, 3, s.data[a.id])
    assert s.kinds() == ["aborted-write-visible"]


def test_a_read_after_an_ok_write_must_not_see_older_content(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, OK, version=1)
    s.write(2, 3, OK, version=2)
    s.read(4, 5, s.data[a.id], version=1)  # stale, by time and by version
    s.read(4, 5, b"", version=0)  # the initial content, after two ok writes
    assert s.kinds() == ["stale-read", "stale-read"]


def test_mount_reads_may_lag_by_the_attribute_ttl_only(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, OK, version=1)
    s.write(2, 3, OK, version=2)
    s.read(3.5, 4, s.data[a.id], via="mount")  # within the slack
    s.read(30, 31, s.data[a.id], via="mount")  # far too late
    c = s.write(40, 41, OK, via="mount")
    s.read(41.5, 42, s.data[a.id], via="mount")  # the mount's own write is seen at once
    assert s.kinds() == ["stale-read", "stale-read"]
    assert c.id


def test_one_version_cannot_hold_two_contents(tmp_path: Path) -> None:
    s = Script(tmp_path)
    a = s.write(0, 1, OK, version=1)
    b = s.write(0, 1, INFO)
    s.read(2, 3, s.data[b.id], version=1)
    assert s.data[a.id] != s.data[b.id]
    assert s.kinds() == ["version-conflict"]


def test_two_conditional_writes_from_one_base_cannot_both_win(tmp_path: Path) -> None:
    s = Script(tmp_path)
    s.write(0, 1, OK, version=4, if_version=True, base=3)
    s.write(0, 1, OK, if_version=True, base=3)
    s.write(2, 3, OK, version=9, if_version=True, base=4)
    assert s.kinds() == ["conditional-write", "conditional-write"]


def test_a_mount_write_shows_whole_or_not_at_all(tmp_path: Path) -> None:
    """A mount writer killed part-way commits nothing (issue 17): an unknown mount write may
    show, but only whole; a prefix of it is a mix."""
    s = Script(tmp_path)
    cut = s.write(0, 5, INFO, via="mount", size=5000, cut=True)
    s.read(6, 7, s.data[cut.id])
    s.read(6, 7, s.data[cut.id][:3000])
    assert s.kinds() == ["mixed-read"]


# ---------------------------------------------------------------- the mount load's judges


def test_an_unfinished_write_may_show_once_whole_and_in_its_place() -> None:
    """finished.py under faults: a write whose end failed may show once, after the writes
    finished before it began; twice, or earlier, is a violation; a version repeating the one
    before it is one version only with repeats_ok, and `repeated` counts it."""
    old, a, b, c = (make(1, n, "f", 3000) for n in (1, 2, 3, 4))
    target = Target("f")
    target.before(old, "old")
    target.finish(a, "w#2")
    target.unknown(b, "w#3")  # began after w#2 finished
    target.finish(c, "w#4")
    keys = {"old": key(old), "a": key(a), "b": key(b), "c": key(c)}

    def judged(names: str, **options: bool) -> list[str]:
        versions = [Version(n, keys[x]) for n, x in enumerate(names.split(), 1)]
        return [v.kind for v in judge_versions(target, versions, **options)]

    assert judged("old a c") == judged("old a b c") == []
    assert judged("old b a c") == ["not-one-version-each"]  # before w#2, which it followed
    assert judged("old a b b c") == ["not-one-version-each"]
    assert judged("old a b b c", repeats_ok=True) == []
    assert judged("old a a c") == ["not-one-version-each"]
    assert judged("old a a c", repeats_ok=True) == []
    assert judged("old a") == ["not-one-version-each"]  # a finished write lost
    assert repeated([Version(n, keys[x]) for n, x in enumerate("old a a b b c".split())]) == 2
    assert target.label(keys["b"]) == "w#3"
    assert [v.kind for v in judge_reads({"f": target}, [Read("f", keys["b"])])] == []


def test_mount_ends_say_which_unfinished_writes_may_have_committed(tmp_path: Path) -> None:
    """mount_ends.py: an unfinished mount write stays `info` only if, while it ran, the mount
    logged an error that leaves a commit's outcome unknown (a failed commit of its inode, or
    any retry), or was killed or stopped, or the write was cut short; else it is `fail`. An
    `ok` one whose commit failed while it ran (bash's `echo x > f` ignores that), or an `ok`
    echo while the mount was killed (which logs nothing), is not finished: settled the same
    way."""
    history = History(tmp_path / "h.jsonl", seed=7)
    ops = {}
    for name, t0, t1 in [("definite", 10, 11), ("unknown", 20, 21), ("retried", 30, 31),
                         ("other-inode", 40, 41), ("killed-mount", 50, 51), ("cut", 60, 61),
                         ("finished", 70, 71), ("ignored", 80, 81), ("ignored-unknown", 90, 91),
                         ("tar-chown", 100, 101), ("echo-mount-killed", 51, 51.2),
                         ("echo-mount-up", 60, 61)]:
        process = {"tar-chown": "shape-tar", "echo-mount-killed": "shape-echo",
                   "echo-mount-up": "shape-echo"}.get(name, "w")
        op = ops[name] = history.invoke(process, "write", name, "shapes")
        history.complete(op, OK if name in ("finished", "ignored", "ignored-unknown",
                                            "echo-mount-killed", "echo-mount-up") else INFO,
                         cut=name == "cut")
        op.invoke, op.complete = t0, t1
    history.fault("kill-mount", "start", "mount")
    history.fault("kill-mount", "stop", "mount")
    history.faults[-1]["time"], history.faults[-1]["stop"] = 50.5, 52.0

    def at(t: float, text: str) -> str:
        stamp = datetime.fromtimestamp(history.wall_start + t)
        return f"{stamp:%Y-%m-%d %H:%M:%S},{stamp.microsecond // 1000:03d} INFO m: {text}"

    inos = {name: i for i, name in enumerate(ops, 100)}
    log = tmp_path / "mount.log"
    log.write_text("\n".join([
        at(10.5, "commit of inode 100 failed, it keeps its previous version: UNAVAILABLE: "
                 "write of inode 100 failed after 5 attempts: need 3 live nodes, have 2"),
        at(20.5, "commit of inode 101 failed, it keeps its previous version: UNAVAILABLE: "
                 "the outcome of transaction 7 is still unknown"),
        at(30.5, "write_file failed (UNAVAILABLE: the outcome of transaction 9 is unknown: "
                 "its record expired before the commit reply came); retrying in 0.05s"),
        at(40.5, "commit of inode 999 failed, it keeps its previous version: TooSlowError: "),
        at(79.99, "commit of inode 107 failed, it keeps its previous version: CONFLICT: x"),
        at(80.5, "commit of inode 107 failed, it keeps its previous version: CONFLICT: x"),
        at(90.5, "commit of inode 108 failed, it keeps its previous version: INTERNAL: x"),
    ]) + "\n")
    ends = MountEnds.read(log, history)
    assert ends.retries == 1
    # tar failed after its close (it could not set the owner): that says nothing of the commit
    # bash's echo exits 0 whatever its close did, and a killed mount logs nothing
    assert ends.classify(history, frozenset({"shapes"}), inos, AFTER_CLOSE, CLOSE_UNREPORTED) == 3
    assert {name: op.outcome for name, op in ops.items()} == {
        "definite": FAIL, "unknown": INFO, "retried": INFO, "other-inode": FAIL,
        "killed-mount": INFO, "cut": INFO, "finished": OK, "ignored": FAIL,
        "ignored-unknown": INFO, "tar-chown": INFO, "echo-mount-killed": INFO,
        "echo-mount-up": OK}
    assert not certain("TooSlowError: ") and certain("ENOSPC: write of inode 4 failed "
                                                     "after 5 attempts: node full")


def test_the_fork_loop_reports_what_it_began_and_finished() -> None:
    """A round's output: finished writes in the order they finished, and every write in the
    order it began, finished, failed, or cut short with the loop (a cut last line is none)."""
    out = "+ 1 9 /a\n+ 2 9 /c\n1 9 /a\n+ 3 9 /a\n2 9 /c\n! 3 9 /a\n+ 4 9 /c\n+ 5 9 /a\n5 9 /a\n+ 6"
    assert finished_by(out) == [(1, 9, "/a"), (2, 9, "/c"), (5, 9, "/a")]
    assert [(b.op, b.path, b.state) for b in begun_by(out)] == [
        (1, "/a", "finished"), (2, "/c", "finished"), (3, "/a", "failed"), (4, "/c", "cut"),
        (5, "/a", "finished")]


# ---------------------------------------------------------------- the judge


def _finding(kind: str, node: int | None, blob: int, chunks: list[int] | None = None,
             ino: int = 5) -> dict[str, object]:
    return {"kind": kind, "ino": ino, "path": "/nemesis/f0", "node": node, "blob": blob,
            "detail": "", "chunks": chunks or [], "fixed": None, "fix": ""}


def _verdicts(findings: list[dict[str, object]], ledger: Ledger) -> list[bool]:
    names = {1: "node-1", 2: "node-2", 3: "node-3", 4: "node-4"}
    attributions, violations = attribute(findings, ledger, names)
    assert len(violations) == sum(a.reason is None for a in attributions)
    return [a.reason is not None for a in attributions]


def test_a_finding_is_explained_only_by_the_fault_injected_there() -> None:
    """The judge of the first check after healing: a bit flip the nemesis made on that node
    in that blob (and chunk) explains a corrupt copy; the same damage anywhere else does not,
    and neither does a missing replica no fault accounts for."""
    ledger = Ledger()
    ledger.flip("node-2", 77, 1)
    assert _verdicts([
        _finding("corrupt_chunk", 2, 77, [1]),  # the flipped chunk
        _finding("checksum_mismatch", 2, 77),
        _finding("corrupt_chunk", 2, 77, [0, 1]),  # chunk 0 was never touched
        _finding("corrupt_chunk", 3, 77, [1]),  # another node
        _finding("corrupt_chunk", 2, 78, [1]),  # another blob
        _finding("missing_replica", 3, 77),  # no fault explains a lost copy
        _finding("orphan_blob", 4, 99),
        _finding("some_new_kind", 2, 77),  # a kind the judge does not know
    ], ledger) == [True, True, False, False, False, False, False, False]


def test_findings_on_removed_or_dead_nodes_are_explained() -> None:
    ledger = Ledger(removed={"node-3"}, down={"node-4"})
    ledger.flip("node-1", 50, 0)
    assert _verdicts([
        _finding("missing_replica", 3, 10),
        _finding("under_replicated", 4, 10),
        _finding("missing_replica", 1, 50),  # the flipped copy, dropped by a repair
        _finding("missing_replica", 2, 10),
        _finding("orphan_blob", 3, 11),  # not a replica finding: no excuse
        {**_finding("stale_staged", 2, 12), "cleanup_in_progress": True},
    ], ledger) == [True, True, True, False, False, True]


def test_a_lost_file_is_explained_only_if_every_bad_copy_is() -> None:
    ledger = Ledger()
    for node in ("node-1", "node-2", "node-3"):
        ledger.flip(node, 60, 0)
    ledger.flip("node-1", 61, 0)
    assert _verdicts([
        *(_finding("corrupt_chunk", n, 60, [0], ino=6) for n in (1, 2, 3)),
        _finding("lost_file", None, 60, ino=6),
        _finding("corrupt_chunk", 1, 61, [0], ino=7),
        _finding("missing_replica", 2, 61, ino=7),
        _finding("missing_replica", 3, 61, ino=7),
        _finding("lost_file", None, 61, ino=7),
    ], ledger) == [True, True, True, True, True, False, False, False]


def test_the_nemesis_never_flips_a_blob_already_flipped_on_another_node() -> None:
    ledger = Ledger()
    ledger.flip("node-1", 60, 0)
    assert ledger.flipped_elsewhere("node-2") == {60}
    assert ledger.flipped_elsewhere("node-1") == set()


# ---------------------------------------------------------------- the proxy


async def _echo_server(nursery: trio.Nursery) -> str:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _roundtrip(address: str, payload: bytes = b"ping", expect: int | None = None
                     ) -> bytes:
    host, port = address.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        for i in range(0, len(payload), 7000):  # in pieces: frames split across reads
            await stream.send_all(payload[i:i + 7000])
        got = b""
        with trio.move_on_after(5):
            while len(got) < (expect or len(payload)):
                data = await stream.receive_some(65536)
                if not data:
                    break
                got += data
        return got


async def test_the_proxy_forwards_cuts_blackholes_slows_and_heals() -> None:
    async with trio.open_nursery() as nursery:
        proxy = Proxy("p", await _echo_server(nursery))
        await nursery.start(proxy.run)
        assert await _roundtrip(proxy.address, b"x" * 300_000) == b"x" * 300_000

        proxy.cut(REFUSE)
        assert await _roundtrip(proxy.address) == b""  # closed at once
        proxy.heal()
        assert await _roundtrip(proxy.address) == b"ping"

        proxy.cut(BLACKHOLE)
        with trio.move_on_after(0.5) as stalled:
            await _roundtrip(proxy.address)
        assert stalled.cancelled_caught
        proxy.heal()

        proxy.slow(0.2)
        start = trio.current_time()
        assert await _roundtrip(proxy.address) == b"ping"
        assert trio.current_time() - start >= 0.4  # both directions
        proxy.heal()
        nursery.cancel_scope.cancel()


async def test_the_proxy_rewrites_the_leader_a_standby_names() -> None:
    """--ha: a NOT_LEADER reply naming a real address is rewritten (frame by frame, also when
    split across reads) and re-sealed with the connection's frame MAC; every other frame
    passes byte for byte. (An echo server: the handshake frames come back as the replies.)"""
    def rewrite(msg: dict[str, object]) -> None:
        if msg.get("error") == "NOT_LEADER":
            msg["leader"] = "127.0.0.1:2222"

    secret, nonce = b"k" * 40, os.urandom(16)
    _, to_client = frame_keys(secret, nonce, nonce, "c1")
    server = FrameMac(send_key=to_client, receive_key=b"")
    handshake = encode({"op": "hello", "ok": True, "nonce": nonce, "cluster": "c1"}) \
        + encode({"ok": True})
    refusal = encode({"ok": False, "error": "NOT_LEADER", "leader": "127.0.0.1:1111", "id": 3})
    other = encode({"ok": True, "id": 4, "data": b"NOT_LEADER" * 3})  # holds the mark too
    plain = encode({"ok": True, "id": 5, "data": os.urandom(200_000)})
    sealed = b"".join(f + server.seal(f) for f in (refusal, other, plain))
    async with trio.open_nursery() as nursery:
        proxy = Proxy("p", await _echo_server(nursery), rewrite=rewrite, secret=secret)
        await nursery.start(proxy.run)
        got = await _roundtrip(proxy.address, handshake + sealed)  # same-length ports
        nursery.cancel_scope.cancel()
    client = FrameMac(send_key=b"", receive_key=to_client)
    frames = []
    while got:
        size = int.from_bytes(got[:4], "big")
        tagged = len(frames) >= 2
        if tagged:
            client.check(got[:4], got[4:4 + size], got[4 + size:4 + size + TAG_BYTES])
        frames.append(decode(got[4:4 + size]))
        got = got[4 + size + (TAG_BYTES if tagged else 0):]
    assert frames[2]["leader"] == "127.0.0.1:2222"
    assert frames[3] == decode(other[4:]) and frames[4] == decode(plain[4:])


# ---------------------------------------------------------------- campaigns

def _mount_wanted() -> bool:
    why = fuse_unavailable()
    if why is not None and os.environ.get("DFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"DFS_REQUIRE_FUSE=1 but {why}")
    return why is None


def _run(tmp_path: Path, duration: float, seed: int, **options: Any) -> Summary:
    mount = _mount_wanted()
    summary = trio.run(campaign, Options(duration=duration, seed=seed,
                                         root=tmp_path / "nemesis", mount=mount, keep=True,
                                         **options))
    problems = "\n".join(f"{v.kind} {v.file}: {v.msg}" for v in summary.violations[:20])
    assert summary.error is None, f"{summary.error} (history {summary.history})"
    assert summary.passed, f"{len(summary.violations)} violations, fault errors " \
                           f"{summary.fault_errors} (history {summary.history}):\n{problems}"
    assert summary.ops[f"write lib {OK}"] > 0 and sum(summary.faults.values()) > 0
    if mount:  # the mount load ran and was judged (issue 17)
        figures = summary.mount_writers
        assert figures["finished"] > 0 and figures["versions"] > 0 and figures["reads"] > 0, \
            figures["line"]
    if "bitflip" in summary.faults:
        # Judged before repaired: the bit flipped after the load is in the first check's
        # findings, explained by the ledger, and then repaired.
        assert summary.explained.get("corrupt_chunk explained", 0) >= 1, summary.judged
        assert "judged" in summary.checker and summary.checker.endswith("then clean")
    return summary


@pytest.mark.timeout(200)
def test_short_nemesis_campaign_finds_no_violation(tmp_path: Path) -> None:
    _run(tmp_path, duration=35, seed=int(os.environ.get("DFS_NEMESIS_SEED", "5")))


#: The mount's own faults first (--cover), with a few of the cluster's under them.
MOUNT_TEST_KINDS = ("kill-writer", "stop-mount", "kill-mount", "pause",
                    "partition-coordinator", "kill")


@pytest.mark.timeout(240)
def test_short_mount_campaign_judges_every_version(tmp_path: Path) -> None:
    """Issue 17 through the campaign: writers of every shape rewrite their files through a
    mount while a second mount reads them, the nemesis kills a writer mid-write and kills and
    stops the mount under one, the coordinator is cut off and killed; every version kept and
    every read is old or one a writer finished (or, for a write whose end failed and whose
    commit may have been decided, that write's whole content, once)."""
    require_fuse()  # fails under DFS_REQUIRE_FUSE=1 (CI), skips elsewhere without FUSE
    summary = _run(tmp_path, duration=20, seed=int(os.environ.get("DFS_NEMESIS_SEED", "17")),
                   kinds=MOUNT_TEST_KINDS, cover=True, repairs=False)
    ran = {k: summary.faults[k] for k in MOUNT_TEST_KINDS[:3]}
    assert all(ran.values()), ran
    assert summary.mount_writers["interrupted"] >= 3, summary.mount_writers["line"]
    print(f"\nmount writers: {summary.mount_writers['line']}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_long_nemesis_campaign_finds_no_violation(tmp_path: Path) -> None:
    _run(tmp_path, duration=float(os.environ.get("DFS_NEMESIS_DURATION", "300")),
         seed=int(os.environ.get("DFS_NEMESIS_SEED", "11")))


# The HA campaign: every leader and etcd fault first (--cover), then a few of the old ones on
# two coordinators (a partitioned one may be cut off from etcd too) and the last bit flip.
HA_TEST_KINDS = (*HA_KINDS, "kill", "pause", "partition-coordinator", "bitflip")


@pytest.mark.timeout(300)
def test_short_ha_campaign_finds_no_violation(tmp_path: Path) -> None:
    """Issue 10: the leader killed, paused and cut off from etcd, one etcd member killed and
    then two of three: a standby takes over, no write is lost or seen half-made, a write
    without etcd's majority never succeeds, and the judged check finds only the last flip."""
    _run_ha(tmp_path, duration=25, seed=int(os.environ.get("DFS_NEMESIS_SEED", "3")))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_long_ha_campaign_finds_no_violation(tmp_path: Path) -> None:
    """Every fault kind, the HA ones among them, for DFS_NEMESIS_DURATION seconds."""
    _run_ha(tmp_path, duration=float(os.environ.get("DFS_NEMESIS_DURATION", "300")),
            seed=int(os.environ.get("DFS_NEMESIS_SEED", "12")), kinds=KINDS, max_faults=2)


def _run_ha(tmp_path: Path, duration: float, seed: int,
            kinds: tuple[str, ...] = HA_TEST_KINDS, max_faults: int = 3) -> None:
    require_etcd()
    options = Options(duration=duration, seed=seed, root=tmp_path / "nemesis",
                      mount=_mount_wanted(), keep=True, ha=True, cover=True, kinds=kinds,
                      max_faults=max_faults, strict_exits=True)
    summary = trio.run(campaign, options)
    problems = "\n".join(f"{v.kind} {v.file}: {v.msg}" for v in summary.violations[:20])
    assert summary.error is None, f"{summary.error} (history {summary.history})"
    assert summary.passed, f"{len(summary.violations)} violations, fault errors " \
                           f"{summary.fault_errors} (history {summary.history}):\n{problems}"
    assert {k: summary.faults[k] for k in HA_KINDS if not summary.faults[k]} == {}
    assert summary.takeovers, summary.fault_details  # a standby took over at least once
    assert any(d.startswith("etcd-majority probe: ") and not d.endswith(": ok")
               for d in summary.fault_details), summary.fault_details
    assert summary.ops[f"write lib {OK}"] > 0
    assert summary.explained.get("corrupt_chunk explained", 0) >= 1, summary.judged
    assert summary.checker.endswith("then clean"), summary.checker


async def test_the_final_replica_check_sees_one_flipped_bit(tmp_path: Path) -> None:
    """The end-of-campaign replica check is not vacuous: a bit flipped on one replica (and not
    repaired) is found on exactly that replica, through the proxies."""
    proxies = Proxies()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxies.run)
        cluster = NemesisCluster(tmp_path, proxies, nodes=3, mount=False)
        try:
            await cluster.start()
            data = os.urandom(3 * 1024 * 1024 + 11)
            async with cluster.client(via="") as client:
                root = await client.resolve("/")
                attr = await client.create(root.ino, b"f", 0o644, 0, 0)
                attr = await client.write_file(attr.ino, io.BytesIO(data))
                nodes = {n["id"]: n["address"] for n in await client.node_list()}
                # The reply comes at the decision; COMMIT reaches the replicas after it. Flip
                # a bit of a COMMITTED copy: wait until every replica acked (record ended).
                with trio.fail_after(20):
                    while await client.txn_list():
                        await trio.sleep(0.05)
            await cluster.stop("node-2")
            assert await cluster.corrupt_random_chunk("node-2", random.Random(1)) is not None
            await cluster.start_proc("node-2")
            by_proxy = {cluster.proxies[f"n-{n}"].address: n for n in cluster.nodes}
            problems = {by_proxy[nodes[r]]: await replica_problem(cluster, attr, nodes[r], data)
                        for r in attr.replicas}
            assert [n for n, p in problems.items() if p] == ["node-2"], problems
            assert "CHECKSUM" in str(problems["node-2"])
        finally:
            await cluster.stop_all()
            nursery.cancel_scope.cancel()
