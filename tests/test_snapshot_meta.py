"""Snapshots in the coordinator's metadata (dfs/meta/snapshots.py, restore.py): what a
snapshot holds, what its encoded inos answer, and what a restore makes of the live tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from meta_helpers import NOW, Sync, dump, open_store

from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO, MetaStore
from dfs.meta.restore import restore_snapshot
from dfs.meta.snapshots import is_snap_ino

CK = b"\x07" * 16


def write(ns: Sync, ino: int, txid: int) -> dict:
    return ns.install_version(ino, txid, base_version=None, if_version=False, size=txid,
                              checksum=CK, replicas=[1, 2, 3], mtime_ns=NOW, now_ns=NOW)


def snapshot(store: MetaStore, path: str, name: bytes):
    snaps = store.namespace.snapshots

    def begin(t):
        root = store.namespace.inodes.get(t, store.namespace.resolve(t, path)["ino"])
        return snaps.begin(t, root, name, path, NOW)

    snap = store.db.write_now(begin)
    puts, inodes, total = store.db.read(lambda t: snaps.collect(t, snap.id, snap.root))
    store.db.write_now(lambda t: snaps.put_piece(t, puts))
    return store.db.write_now(lambda t: snaps.finish(t, snap.id, inodes, total))


def tree(store: MetaStore, path: str) -> dict[str, tuple]:
    """Every path below `path` with what a reader sees of it."""
    out: dict[str, tuple] = {}

    def walk(t, ino: int, prefix: str) -> None:
        for name, _, attr in store.namespace.readdir(t, ino, 0, 1000):
            p = f"{prefix}/{name.decode()}"
            out[p] = (attr["mode"] & 0o170000, attr["blob"], attr["size"], attr["uid"])
            if attr["mode"] & 0o040000:
                walk(t, attr["ino"], p)

    store.db.read(lambda t: walk(t, store.namespace.resolve(t, path)["ino"], ""))
    return out


def test_a_snapshot_is_read_through_encoded_inos_and_refuses_changes(store, ns) -> None:
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)["ino"]
    f = ns.create(d, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    snapshot(store, "/d", b"s")
    write(ns, f, 101)
    read = lambda fn: store.db.read(fn)  # noqa: E731
    attr = read(lambda t: store.namespace.resolve(t, "/d/.snapshots/s/f"))
    assert is_snap_ino(attr["ino"]) and attr["blob"] == 100 and attr["mode"] & 0o222 == 0
    assert read(lambda t: store.namespace.resolve(t, "/d/f"))["blob"] == 101
    listing = read(lambda t: store.namespace.readdir(t, d, 0, 100))
    assert [e[0] for e in listing] == [b"f"]  # .snapshots is not listed
    up = read(lambda t: store.namespace.resolve(t, "/d/.snapshots/s/.."))
    assert up["ino"] == read(lambda t: store.namespace.resolve(t, "/d/.snapshots"))["ino"]
    for call in (lambda: ns.setattr(attr["ino"], {"mode": 0o600}, NOW),
                 lambda: ns.unlink(read(lambda t: store.namespace.resolve(
                     t, "/d/.snapshots/s"))["ino"], b"f", NOW),
                 lambda: ns.restore(attr["ino"], 1, NOW)):
        with pytest.raises(DfsError) as info:
            call()
        assert info.value.code is Code.EROFS
    assert [h.ino for h in read(lambda t: store.namespace.inodes.holders(t, 100))] == [f]


def test_restore_brings_the_subtree_back_exactly(store, ns) -> None:
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)["ino"]
    sub = ns.mkdir(d, b"sub", 0o755, 0, 0, NOW)["ino"]
    a = ns.create(d, b"a", 0o644, 0, 0, NOW)["ino"]
    b = ns.create(sub, b"b", 0o644, 0, 0, NOW)["ino"]
    c = ns.create(d, b"c", 0o644, 0, 0, NOW)["ino"]
    write(ns, a, 100)
    write(ns, b, 101)
    write(ns, c, 102)
    before = tree(store, "/d")
    snap = snapshot(store, "/d", b"s")
    write(ns, a, 200)  # rewritten
    ns.unlink(sub, b"b", NOW)  # deleted, then its directory too
    ns.rmdir(d, b"sub", NOW)
    ns.rename(d, b"c", d, b"c2", 0, NOW)  # renamed within
    ns.setattr(c, {"uid": 7}, NOW)
    n = ns.create(d, b"new", 0o644, 0, 0, NOW)["ino"]  # made since
    write(ns, n, 300)
    outside = ns.create(ROOT_INO, b"outside", 0o644, 0, 0, NOW)["ino"]
    counts = store.db.write_now(lambda t: restore_snapshot(store.namespace, t, snap, NOW))
    assert tree(store, "/d") == before
    assert counts["rewritten"] == 1 and counts["recreated"] == 2  # a; sub and b
    assert store.db.read(lambda t: store.namespace.getattr(t, a))["version"] == 3
    assert store.db.read(lambda t: store.namespace.inodes.find(t, n)) is None
    assert store.db.read(lambda t: store.namespace.getattr(t, d))["nlink"] == 3
    assert store.db.read(lambda t: store.namespace.getattr(t, outside))["ino"] == outside
    # A snapshot file moved out of the subtree since: refused, nothing changed.
    ns.rename(d, b"a", ROOT_INO, b"a-out", 0, NOW)
    frozen = dump(store)
    with pytest.raises(DfsError) as info:
        store.db.write_now(lambda t: restore_snapshot(store.namespace, t, snap, NOW))
    assert info.value.code is Code.CONFLICT and "moved out" in info.value.msg
    assert dump(store) == frozen


def test_the_reference_check_finds_and_fixes_each_kind_of_drift(tmp_path: Path) -> None:
    from dfs.meta.codec import U64x3, k64
    from dfs.meta.refcheck import RefCheck

    store = open_store(tmp_path / "m", keep_versions=3)
    ns = Sync(store, store.namespace)
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    g = ns.create(ROOT_INO, b"g", 0o644, 0, 0, NOW)["ino"]
    for txid in (100, 101, 102):
        write(ns, f, txid)
    write(ns, g, 200)
    snapshot(store, "/", b"s")
    refs = RefCheck(store.db, store.namespace.inodes)
    assert store.db.read(refs.judge) == ([], 0)
    # Drift, as a bug or a torn migration could leave it: a kept version's entry lost (GC
    # would delete its copies), a snapshot's entry lost, stale entries (leaks).
    held = store.db["snapheld"]

    def drift(t) -> None:
        assert t.delete(U64x3.pack(100, f, 1), db=store.db["retained"])
        assert t.delete(U64x3.pack(200, 1, g), db=held)
        t.put(U64x3.pack(999, 1, g), b"", db=held)
        newest = store.namespace.inodes.versions.list(t, f)[0]  # version 2, blob 101
        assert t.delete(newest.key(), db=store.db["versions"])

    store.db.write_now(drift)
    found, total = store.db.read(refs.judge)
    assert {(x.kind, x.table, x.blob) for x in found} == {
        ("missing_ref", "retained", 100), ("missing_ref", "snapheld", 200),
        ("stale_ref", "snapheld", 999), ("stale_ref", "retained", 101)} and total == 4
    assert all(store.db.write_now(lambda t, x=x: refs.repair(t, x, NOW)) for x in found)
    assert store.db.read(refs.judge) == ([], 0)
    lists = store.db.read(lambda t: store.namespace.inodes.lists(t, 100, 1))
    assert lists, "the kept version's copies are counted again"
    # A file's record gone under its history: the history is a leak, dropped to GC.
    store.db.write_now(lambda t: t.delete(k64(f), db=store.db["inodes"]))
    found, total = store.db.read(refs.judge)
    assert {(x.kind, x.blob) for x in found} == {("orphan_version", 100)}
    assert store.db.write_now(lambda t: refs.repair(t, found[0], NOW))
    assert store.db.read(refs.judge) == ([], 0)
    assert (1, 100) in {(e.node, e.blob) for e in store.db.read(store.gc.all)}
    store.close()
