"""Version history in the coordinator's metadata (docs/coordinator.md, "Version history"):
which versions a file keeps, where their copies are, and when the GC may delete them."""

from __future__ import annotations

from pathlib import Path

import pytest
from meta_helpers import GRACE, NOW, Sync, open_store

from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO, MetaStore

CK = b"\x07" * 16


@pytest.fixture
def store(tmp_path: Path):
    """Keeping 2 versions (conftest's `ns` runs over this one)."""
    s = open_store(tmp_path / "meta", keep_versions=2)
    yield s
    s.close()


def write(ns: Sync, ino: int, txid: int, size: int = 10, replicas: tuple[int, ...] = (1, 2, 3),
          at: int = NOW) -> dict:
    return ns.install_version(ino, txid, base_version=None, if_version=False, size=size,
                              checksum=CK, replicas=list(replicas), mtime_ns=at, now_ns=at)


def gc_blobs(store: MetaStore) -> set[tuple[int, int]]:
    return {(e.node, e.blob) for e in store.db.read(store.gc.all)}


def holders(store: MetaStore, blob: int) -> list:
    return store.db.read(lambda t: store.namespace.inodes.holders(t, blob))


def versions(store: MetaStore, ino: int) -> list[tuple[int, int | None]]:
    return [(v.version, v.blob) for v in
            store.db.read(lambda t: store.namespace.versions(t, ino))]


def test_a_file_keeps_its_last_k_versions_and_the_older_ones_go_to_gc(store, ns) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    for txid in (100, 101, 102, 103):
        write(ns, f, txid)
    # Current: version 4 = blob 103; kept: 3 (102) and 2 (101); version 1 (100) dropped.
    assert versions(store, f) == [(3, 102), (2, 101)]
    assert gc_blobs(store) == {(1, 100), (2, 100), (3, 100)}
    assert [h.ino for h in holders(store, 101)] == [f]
    assert holders(store, 100) == []
    old = store.db.read(lambda t: store.namespace.version(t, f, 2))
    assert (old.blob, old.size, old.replicas) == (101, 10, [1, 2, 3])
    with pytest.raises(DfsError) as info:
        store.db.read(lambda t: store.namespace.version(t, f, 1))
    assert info.value.code is Code.ENOENT


def test_keep_0_is_todays_behaviour(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m")
    ns = Sync(s, s.namespace)
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    write(ns, f, 101)
    assert versions(s, f) == []
    assert gc_blobs(s) == {(1, 100), (2, 100), (3, 100)}
    s.close()


def test_a_directory_xattr_sets_the_count_for_its_subtree(store, ns) -> None:
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)["ino"]
    sub = ns.mkdir(d, b"sub", 0o755, 0, 0, NOW)["ino"]
    ns.setxattr(d, b"user.dfs.keep_versions", b"0", 0, NOW)
    f = ns.create(sub, b"f", 0o644, 0, 0, NOW)["ino"]
    g = ns.create(ROOT_INO, b"g", 0o644, 0, 0, NOW)["ino"]
    for txid in (100, 101, 102):
        write(ns, f, txid)
        write(ns, g, txid + 10)
    assert versions(store, f) == []  # inherited 0 from d
    assert versions(store, g) == [(2, 111), (1, 110)]  # the cluster default, 2
    # Renamed out of d, the file follows the policy of where its name now is.
    ns.rename(sub, b"f", ROOT_INO, b"f", 0, NOW)
    write(ns, f, 103)
    assert versions(store, f) == [(3, 102)]
    for bad in (b"x", b"-1", b"1001"):
        with pytest.raises(DfsError) as info:
            ns.setxattr(d, b"user.dfs.keep_versions", bad, 0, NOW)
        assert info.value.code is Code.EINVAL


def test_truncate_keeps_the_content_it_replaces(store, ns) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    ns.setattr(f, {"size": 0}, NOW)
    assert versions(store, f) == [(1, 100)]
    assert gc_blobs(store) == set()


def test_restore_shares_the_blob_and_gc_keeps_it_while_anything_names_it(store, ns) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    write(ns, f, 101)
    write(ns, f, 102)  # current 3 (102); kept 2 (101), 1 (100)
    attr = ns.restore(f, 1, NOW)
    assert (attr["version"], attr["blob"], attr["replicas"]) == (4, 100, [1, 2, 3])
    # Version 3 (102) is kept now; version 1 still names 100, as the current one does.
    assert versions(store, f) == [(3, 102), (2, 101)]
    # Version 1 fell off the kept list (K=2) as its blob became current: the GC entries
    # that left are never delivered, for the current file lists those very copies.
    assert gc_blobs(store) == {(n, 100) for n in (1, 2, 3)}
    assert [type(h).__name__ for h in holders(store, 100)] == ["Inode"]
    assert all(store.db.read(lambda t, n=n: store.namespace.inodes.lists(t, 100, n))
               for n in (1, 2, 3))
    write(ns, f, 103)  # 100 becomes kept again (version 4), 2 (101) is dropped
    assert versions(store, f) == [(4, 100), (3, 102)]
    assert gc_blobs(store) == {(n, b) for n in (1, 2, 3) for b in (100, 101)}
    assert [type(h).__name__ for h in holders(store, 100)] == ["Version"]
    with pytest.raises(DfsError) as info:
        ns.restore(f, 2, NOW)
    assert info.value.code is Code.ENOENT


def test_the_gc_skips_copies_a_retained_version_lists(store, ns) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    write(ns, f, 101)
    lists = lambda blob, node: store.db.read(  # noqa: E731
        lambda t: store.namespace.inodes.lists(t, blob, node))
    assert lists(100, 1) and lists(101, 2) and not lists(100, 4)
    # A repair moves version 1's copy from node 3 to node 4: the record says so.
    store.db.write_now(lambda t: store.namespace.inodes.set_replicas(t, f, 100, [1, 2, 4]))
    assert lists(100, 4) and not lists(100, 3)
    assert store.db.read(lambda t: store.namespace.version(t, f, 1)).replicas == [1, 2, 4]


def test_deleting_the_file_drops_its_versions(store, ns) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    write(ns, f, 100)
    write(ns, f, 101)
    ns.unlink(ROOT_INO, b"f", NOW)
    assert store.db.read(lambda t: store.namespace.inodes.versions.count(t)) == 0
    assert gc_blobs(store) == {(n, b) for n in (1, 2, 3) for b in (100, 101)}
    assert holders(store, 100) == [] and holders(store, 101) == []
    assert all(e.not_before_ns == NOW + GRACE for e in store.db.read(store.gc.all))


def test_the_mounts_virtual_names_are_reserved(store, ns) -> None:
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)["ino"]
    f = ns.create(d, b"f", 0o644, 0, 0, NOW)["ino"]
    for name in (b".versions", b".snapshots"):
        for call, args in ((ns.mkdir, (d, name, 0o755, 0, 0, NOW)),
                           (ns.create, (d, name, 0o644, 0, 0, NOW, False)),
                           (ns.symlink, (d, name, b"x", 0, 0, NOW)),
                           (ns.link, (f, d, name, NOW)),
                           (ns.rename, (d, b"f", d, name, 0, NOW))):
            with pytest.raises(DfsError) as info:
                call(*args)
            assert info.value.code is Code.EINVAL and b"reserved" in info.value.msg.encode()
    assert store.db.read(lambda t: store.namespace.lookup(t, d, b"f"))["ino"] == f
