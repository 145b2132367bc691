"""The sans-IO parts of checking and repair: the copy plan (which replicas stay, move, are
re-made) and the checker's rules on hand-made snapshots."""

from __future__ import annotations

import stat

import pytest

from dfs.checker import scan
from dfs.checker.findings import Kind
from dfs.checker.scan import FileRow, NodeView, Paths, Snapshot
from dfs.coordinator.copyplan import new_replica_list, plan_copy, verdict_without_source

UP, DRAINING, REMOVED = "up", "draining", "removed"
REG, DIR = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
SUM = b"s" * 16


# ---------------------------------------------------------------- the copy plan


def test_plan_replaces_a_removed_node_and_reuses_nothing_of_it() -> None:
    plan = plan_copy([1, 2, 9], 3, {1: UP, 2: UP, 9: REMOVED}, {1, 2}, [], evacuate_down=False)
    assert (plan.keep, plan.evacuate, plan.new, plan.sources) == ([1, 2], [9], 1, [1, 2])
    assert new_replica_list(plan, 3, [4]) == [1, 2, 4]
    assert new_replica_list(plan, 3, []) == [1, 2], "a removed node is dropped even unreplaced"


def test_plan_fixes_a_bad_copy_in_place_on_a_live_up_node() -> None:
    plan = plan_copy([1, 2, 3], 3, {1: UP, 2: UP, 3: UP}, {1, 2, 3}, [2], evacuate_down=False)
    assert (plan.keep, plan.in_place, plan.new, plan.sources) == ([1, 3], [2], 0, [1, 3])
    assert new_replica_list(plan, 3, []) == [1, 2, 3], "order kept; a failed in-place copy stays listed"


def test_plan_moves_a_bad_copy_off_a_down_node_and_keeps_it_if_nowhere_to_go() -> None:
    plan = plan_copy([1, 2, 3], 3, {1: UP, 2: UP, 3: UP}, {1, 2}, [3], evacuate_down=False)
    assert (plan.in_place, plan.evacuate, plan.new) == ([], [3], 1)
    assert new_replica_list(plan, 3, [5]) == [1, 2, 5]
    assert new_replica_list(plan, 3, []) == [1, 2, 3]


def test_plan_down_nodes_are_evacuated_only_when_asked() -> None:
    states, live = {1: UP, 2: UP, 3: UP}, {1, 2}
    assert plan_copy([1, 2, 3], 3, states, live, [], evacuate_down=False).nothing_to_do
    plan = plan_copy([1, 2, 3], 3, states, live, [], evacuate_down=True)
    assert (plan.evacuate, plan.new) == ([3], 1)


def test_plan_drains_with_the_draining_node_as_last_resort_source() -> None:
    plan = plan_copy([4, 1, 2], 3, {1: UP, 2: UP, 4: DRAINING}, {1, 2, 4}, [],
                     evacuate_down=False)
    assert (plan.keep, plan.evacuate, plan.sources, plan.new) == ([1, 2], [4], [1, 2, 4], 1)
    assert new_replica_list(plan, 3, [7]) == [1, 2, 7]
    assert new_replica_list(plan, 3, []) == [4, 1, 2], "an unreplaced draining copy stays listed"


def test_plan_tops_up_an_under_replicated_file() -> None:
    plan = plan_copy([1], 3, {1: UP, 2: UP, 3: UP}, {1, 2, 3}, [], evacuate_down=False)
    assert plan.new == 2 and new_replica_list(plan, 3, [2, 3]) == [1, 2, 3]


@pytest.mark.parametrize(("live", "expect"), [({1, 2, 3}, "lost"), ({1, 2}, "unavailable")])
def test_no_source_is_lost_or_unavailable(live: set[int], expect: str) -> None:
    plan = plan_copy([1, 2, 3], 3, {1: UP, 2: UP, 3: UP}, live, [1, 2] + ([3] if 3 in live else []),
                     evacuate_down=False)
    assert plan.sources == []
    assert verdict_without_source(plan, live) == expect


# ---------------------------------------------------------------- the checker's rules


def row(ino: int, blob: int | None, replicas: tuple[int, ...] = (1, 2, 3), size: int = 10,
        mode: int = REG) -> FileRow:
    return FileRow(ino, mode, 1, 1, blob, size, SUM if blob else None, replicas, 1)


def snapshot_of(files: list[FileRow], nodes: dict[int, NodeView]) -> Snapshot:
    snap = Snapshot(r=3, nodes=nodes)
    snap.files = {1: row(1, None, (), 0, DIR), **{f.ino: f for f in files}}
    return snap


def node(n: int, blobs: dict[int, tuple] | None, state: str = UP) -> NodeView:
    return NodeView(n, f"127.0.0.1:{n}", state, blobs)


def test_rules_name_each_bad_copy_per_file_and_node() -> None:
    good = ("COMMITTED", 10, SUM)
    files = [row(2, 100), row(3, 101), row(4, 102), row(5, 103, (1, 2))]
    nodes = {
        1: node(1, {100: good, 101: ("COMMITTED", 11, SUM), 102: good, 103: good}),
        2: node(2, {100: ("STAGED", None, None), 101: good, 102: ("PREPARED", 10, b"x" * 16),
                    103: good}),
        3: node(3, None, "down"),
    }
    found = {(f.kind, f.ino, f.node) for f in scan.check_replicas(files, nodes, 3)}
    assert found == {
        (Kind.MISSING, 2, 2), (Kind.UNDER, 2, 3),
        (Kind.SIZE, 3, 1), (Kind.UNDER, 3, 3),
        (Kind.CHECKSUM, 4, 2), (Kind.UNDER, 4, 3),
        (Kind.UNDER, 5, None),
    }


def test_lost_only_when_every_copy_is_bad_and_none_is_on_a_down_node() -> None:
    files = {2: row(2, 100, (1, 2)), 3: row(3, 101, (1, 3))}
    findings = [*scan.check_replicas(files.values(), {1: node(1, {}), 2: node(2, {}),
                                                      3: node(3, None, "down")}, 2)]
    lost = scan.lost_files(findings, files)
    assert [(f.kind, f.ino) for f in lost] == [(Kind.LOST, 2)]


def test_unreferenced_blobs_exclude_listed_copies_and_the_gc_queue() -> None:
    files = [row(2, 100, (1,))]
    nodes = {1: node(1, {100: ("COMMITTED", 10, SUM), 200: ("COMMITTED", 5, SUM),
                         201: ("STAGED", None, None), 202: ("PREPARED", 5, SUM),
                         203: ("COMMITTED", 5, SUM)}),
             2: node(2, {100: ("COMMITTED", 10, SUM)})}
    snap = snapshot_of(files, nodes)
    snap.gc = {(1, 203)}
    found = {(f.kind, f.node, f.blob) for f in scan.unreferenced(snap)}
    assert found == {(Kind.ORPHAN, 1, 200), (Kind.STAGED, 1, 201), (Kind.PREPARED, 1, 202),
                     (Kind.ORPHAN, 2, 100)}


def test_namespace_rules_and_paths() -> None:
    files = {1: row(1, None, (), 0, DIR), 2: row(2, None, (), 0, DIR), 3: row(3, 7),
             4: row(4, 8)}
    entries = [(1, b"d", 2), (2, b"a", 3), (2, b"gone", 9), (77, b"x", 3)]
    found = {(f.kind, f.ino, f.parent, f.name) for f in scan.check_namespace(files, entries)}
    assert found == {(Kind.DANGLING, 9, 2, b"gone"), (Kind.DANGLING, 3, 77, b"x"),
                     (Kind.UNLINKED, 4, None, None)}
    paths = Paths(entries)
    assert paths.path(3) == "/d/a" and paths.path(4) is None
    assert paths.under(3, 2) and not paths.under(2, 3)


def test_deep_verdicts_become_findings() -> None:
    by_blob = {100: row(2, 100), 101: row(3, 101), 102: row(4, 102)}
    verdicts = {(1, 100): {"ok": True, "state": "COMMITTED"},
                (1, 101): {"ok": False, "state": "COMMITTED", "bad_chunks": [0, 3]},
                (2, 102): {"ok": False, "state": "COMMITTED", "bad_chunks": []},
                (3, 102): {"ok": False, "state": None}}
    found = {(f.kind, f.ino, f.node, tuple(f.chunks)) for f in scan.check_deep(verdicts, by_blob)}
    assert found == {(Kind.CORRUPT, 3, 1, (0, 3)), (Kind.CHECKSUM, 4, 2, ()),
                     (Kind.MISSING, 4, 3, ())}
