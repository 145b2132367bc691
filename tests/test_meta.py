"""The coordinator's metadata on real LMDB: namespace rules, txn log, node table, GC queue."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from meta_helpers import GRACE, NOW, Sync, dump, open_store

from dfs.errors import Code, DfsError
from dfs.meta import (
    FORMAT_VERSION,
    ROOT_INO,
    XATTR_CREATE,
    XATTR_REPLACE,
    MetaStore,
    NodeState,
    TxnRecord,
    TxnState,
)
from dfs.meta.cluster import FORMAT

CK = b"\x07" * 16


def raises(code: Code, fn, *args, **kwargs) -> DfsError:
    with pytest.raises(DfsError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code, info.value
    return info.value


def gc_entries(store: MetaStore) -> list[tuple[int, int, int]]:
    return [(e.not_before_ns, e.node, e.blob) for e in store.db.read(store.gc.all)]


# ---------------------------------------------------------------- cluster meta


def test_first_start_creates_root_and_identity_and_reopen_keeps_them(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m", replicas=2)
    root = s.db.read(lambda t: s.namespace.getattr(t, ROOT_INO))
    assert root["mode"] == stat.S_IFDIR | 0o755 and root["nlink"] == 2
    cluster = s.cluster_id
    assert len(cluster) == 32 and int(cluster, 16) >= 0
    assert s.db.read(lambda t: s.cluster.get(t, FORMAT)) == FORMAT_VERSION == 1
    s.close()
    again = open_store(tmp_path / "m", replicas=5)
    assert again.cluster_id == cluster
    assert again.replicas == 2, "R is fixed at first start"
    again.close()
    other = open_store(tmp_path / "other")
    assert other.cluster_id != cluster
    other.close()


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m")
    s.db.write_now(lambda t: s.cluster.put(t, FORMAT, 99))
    s.close()
    with pytest.raises(DfsError, match="format version 99"):
        open_store(tmp_path / "m")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"\0"])
def test_invalid_names_are_einval_and_change_nothing(store: MetaStore, ns: Sync,
                                                     name: bytes) -> None:
    before = dump(store)
    raises(Code.EINVAL, ns.mkdir, ROOT_INO, name, 0o755, 0, 0, NOW)
    raises(Code.EINVAL, ns.create, ROOT_INO, name, 0o644, 0, 0, NOW)
    raises(Code.EINVAL, ns.symlink, ROOT_INO, name, b"t", 0, 0, NOW)
    assert dump(store) == before


def test_name_length_limit_is_255_bytes(store: MetaStore, ns: Sync) -> None:
    before = dump(store)
    raises(Code.ENAMETOOLONG, ns.create, ROOT_INO, b"x" * 256, 0o644, 0, 0, NOW)
    assert dump(store) == before
    assert ns.create(ROOT_INO, b"x" * 255, 0o644, 0, 0, NOW)["nlink"] == 1
    # Non-UTF-8 bytes are fine: names are raw bytes.
    assert ns.create(ROOT_INO, b"\xff\xfe", 0o644, 0, 0, NOW)["ino"] > ROOT_INO


# ---------------------------------------------------------------- create, mkdir, nlink


def test_directory_nlink_is_two_plus_subdirectories(ns: Sync) -> None:
    a = ns.mkdir(ROOT_INO, b"a", 0o750, 5, 6, NOW)
    assert a["mode"] == stat.S_IFDIR | 0o750 and a["nlink"] == 2 and a["uid"] == 5
    ns.mkdir(a["ino"], b"b", 0o755, 0, 0, NOW)
    ns.mkdir(a["ino"], b"c", 0o755, 0, 0, NOW)
    ns.create(a["ino"], b"f", 0o644, 0, 0, NOW)
    assert ns.getattr(a["ino"])["nlink"] == 4, "files don't count, subdirectories do"
    assert ns.getattr(ROOT_INO)["nlink"] == 3
    ns.rmdir(a["ino"], b"b", NOW)
    assert ns.getattr(a["ino"])["nlink"] == 3


def test_create_mkdir_errors(ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)
    assert f["mode"] == stat.S_IFREG | 0o644 and f["version"] == 0 and f["blob"] is None
    raises(Code.EEXIST, ns.create, ROOT_INO, b"f", 0o644, 0, 0, NOW)
    assert ns.create(ROOT_INO, b"f", 0o600, 0, 0, NOW, exclusive=False)["ino"] == f["ino"]
    raises(Code.EEXIST, ns.mkdir, ROOT_INO, b"f", 0o755, 0, 0, NOW)
    raises(Code.ENOTDIR, ns.create, f["ino"], b"x", 0o644, 0, 0, NOW)
    raises(Code.ENOTDIR, ns.lookup, f["ino"], b"x")
    raises(Code.ENOENT, ns.create, 999, b"x", 0o644, 0, 0, NOW)
    raises(Code.EINVAL, ns.create, ROOT_INO, b"fifo", stat.S_IFIFO | 0o644, 0, 0, NOW)
    ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)
    raises(Code.EISDIR, ns.create, ROOT_INO, b"d", 0o644, 0, 0, NOW, exclusive=False)


def test_unlink_rmdir_errors(ns: Sync) -> None:
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)
    ns.create(d["ino"], b"f", 0o644, 0, 0, NOW)
    raises(Code.EISDIR, ns.unlink, ROOT_INO, b"d", NOW)
    raises(Code.ENOTEMPTY, ns.rmdir, ROOT_INO, b"d", NOW)
    raises(Code.ENOTDIR, ns.rmdir, d["ino"], b"f", NOW)
    raises(Code.ENOENT, ns.unlink, ROOT_INO, b"nope", NOW)
    ns.unlink(d["ino"], b"f", NOW)
    ns.rmdir(ROOT_INO, b"d", NOW)
    raises(Code.ENOENT, ns.getattr, d["ino"])
    raises(Code.ENOENT, ns.lookup, ROOT_INO, b"d")


def test_hard_links_and_deletion_with_the_last_link_queues_the_blob(store: MetaStore,
                                                                     ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)
    ns.install_version(f["ino"], 41, base_version=0, if_version=True, size=3, checksum=CK,
                       replicas=[1, 2, 3], mtime_ns=None, now_ns=NOW)
    d = ns.mkdir(ROOT_INO, b"d", 0o755, 0, 0, NOW)
    assert ns.link(f["ino"], d["ino"], b"g", NOW)["nlink"] == 2
    raises(Code.EEXIST, ns.link, f["ino"], d["ino"], b"g", NOW)
    raises(Code.EPERM, ns.link, d["ino"], ROOT_INO, b"dlink", NOW)
    ns.unlink(ROOT_INO, b"f", NOW)
    assert ns.lookup(d["ino"], b"g")["nlink"] == 1
    assert gc_entries(store) == [], "the blob is still referenced"
    ns.unlink(d["ino"], b"g", NOW + 5)
    raises(Code.ENOENT, ns.getattr, f["ino"])
    assert gc_entries(store) == [(NOW + 5 + GRACE, n, 41) for n in (1, 2, 3)]


def test_symlink_and_readlink(ns: Sync) -> None:
    s = ns.symlink(ROOT_INO, b"s", b"../target", 1, 2, NOW)
    assert stat.S_ISLNK(s["mode"]) and s["size"] == 9 and s["target"] == b"../target"
    assert ns.readlink(s["ino"]) == b"../target"
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)
    raises(Code.EINVAL, ns.readlink, f["ino"])
    raises(Code.ENOENT, ns.symlink, ROOT_INO, b"e", b"", 0, 0, NOW)
    raises(Code.ENAMETOOLONG, ns.symlink, ROOT_INO, b"long", b"x" * 4097, 0, 0, NOW)


def test_resolve_walks_paths_without_following_symlinks(ns: Sync) -> None:
    a = ns.mkdir(ROOT_INO, b"a", 0o755, 0, 0, NOW)
    b = ns.mkdir(a["ino"], b"b", 0o755, 0, 0, NOW)
    f = ns.create(b["ino"], b"f", 0o644, 0, 0, NOW)
    ns.symlink(ROOT_INO, b"s", b"/a", 0, 0, NOW)
    assert ns.resolve("/")["ino"] == ROOT_INO
    assert ns.resolve("/a/b/f")["ino"] == f["ino"]
    assert ns.resolve("//a/./b/../b/f")["ino"] == f["ino"]
    assert ns.resolve("/a/..")["ino"] == ROOT_INO
    assert ns.resolve("/..")["ino"] == ROOT_INO
    raises(Code.ENOENT, ns.resolve, "/a/nope")
    raises(Code.ENOTDIR, ns.resolve, "/a/b/f/x")
    raises(Code.ENOTDIR, ns.resolve, "/a/b/f/")
    raises(Code.ENOTDIR, ns.resolve, "/s/b")
    raises(Code.EINVAL, ns.resolve, "a/b")
    raises(Code.ENAMETOOLONG, ns.resolve, "/" + "x" * 256)


# ---------------------------------------------------------------- setattr, xattrs


def test_setattr_and_truncate_make_a_new_empty_version(store: MetaStore, ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)
    ns.install_version(f["ino"], 7, base_version=None, if_version=False, size=10,
                       checksum=CK, replicas=[4, 5], mtime_ns=123, now_ns=NOW)
    a = ns.setattr(f["ino"], {"mode": 0o100600 | 0o4000, "uid": 9, "atime_ns": 5}, NOW + 1)
    assert a["mode"] == stat.S_IFREG | 0o4600 and a["uid"] == 9 and a["atime_ns"] == 5
    assert a["ctime_ns"] == NOW + 1 and a["version"] == 1
    raises(Code.EINVAL, ns.setattr, f["ino"], {"size": 5}, NOW)
    raises(Code.EINVAL, ns.setattr, f["ino"], {"nlink": 5}, NOW)
    t = ns.setattr(f["ino"], {"size": 0}, NOW + 2)
    assert (t["size"], t["version"], t["blob"], t["replicas"]) == (0, 2, None, [])
    assert gc_entries(store) == [(NOW + 2 + GRACE, 4, 7), (NOW + 2 + GRACE, 5, 7)]
    assert ns.setattr(f["ino"], {"size": 0}, NOW + 3)["version"] == 2, "already empty"
    raises(Code.EISDIR, ns.setattr, ROOT_INO, {"size": 0}, NOW)


def test_policy_xattrs_are_stored_on_directories_and_inherited(ns: Sync) -> None:
    """user.dfs.on_conflict (docs/mount.md): the one user.dfs.* name anyone may store, on
    directories only, with its values only; the nearest ancestor that sets it wins."""
    a = ns.mkdir(ROOT_INO, b"a", 0o755, 0, 0, NOW)["ino"]
    b = ns.mkdir(a, b"b", 0o755, 0, 0, NOW)["ino"]
    c = ns.mkdir(b, b"c", 0o755, 0, 0, NOW)["ino"]
    f = ns.create(c, b"f", 0o644, 0, 0, NOW)["ino"]
    name = b"user.dfs.on_conflict"
    raises(Code.ENODATA, ns.getxattr_inherited, c, name)
    ns.setxattr(a, name, b"fail", 0, NOW)
    assert ns.getxattr_inherited(c, name) == b"fail"
    assert ns.listxattr(a) == [name]
    ns.setxattr(b, name, b"overwrite", 0, NOW)
    assert ns.getxattr_inherited(c, name) == b"overwrite"
    assert ns.getxattr_inherited(a, name) == b"fail"
    raises(Code.EINVAL, ns.setxattr, f, name, b"fail", 0, NOW)
    raises(Code.EINVAL, ns.setxattr, a, name, b"later", 0, NOW)
    raises(Code.EPERM, ns.setxattr, a, b"user.dfs.versions", b"1", 0, NOW)
    ns.removexattr(b, name, NOW)
    assert ns.getxattr_inherited(c, name) == b"fail"
    ns.removexattr(a, name, NOW)
    raises(Code.ENODATA, ns.getxattr_inherited, c, name)


def test_xattrs_flags_and_errors(store: MetaStore, ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    raises(Code.ENODATA, ns.getxattr, f, b"user.a")
    ns.setxattr(f, b"user.a", b"1", 0, NOW)
    raises(Code.EEXIST, ns.setxattr, f, b"user.a", b"2", XATTR_CREATE, NOW)
    raises(Code.ENODATA, ns.setxattr, f, b"user.b", b"2", XATTR_REPLACE, NOW)
    ns.setxattr(f, b"user.a", b"3", XATTR_REPLACE, NOW)
    ns.setxattr(f, b"user.b", b"", XATTR_CREATE, NOW)
    assert ns.getxattr(f, b"user.a") == b"3" and ns.getxattr(f, b"user.b") == b""
    assert ns.listxattr(f) == [b"user.a", b"user.b"]
    raises(Code.EPERM, ns.setxattr, f, b"user.dfs.version", b"1", 0, NOW)
    raises(Code.ENAMETOOLONG, ns.setxattr, f, b"u" * 256, b"1", 0, NOW)
    raises(Code.ENOSPC, ns.setxattr, f, b"user.big", b"x" * (64 * 1024 + 1), 0, NOW)
    ns.removexattr(f, b"user.a", NOW)
    raises(Code.ENODATA, ns.removexattr, f, b"user.a", NOW)
    assert ns.listxattr(f) == [b"user.b"]
    assert "xattrs" not in ns.getattr(f), "attr replies stay small"


# ---------------------------------------------------------------- install_version


def test_install_version_if_version_conflict_changes_nothing(store: MetaStore,
                                                             ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    a = ns.install_version(f, 10, base_version=0, if_version=True, size=5, checksum=CK,
                           replicas=[1, 2, 3], mtime_ns=None, now_ns=NOW)
    assert (a["version"], a["blob"], a["size"], a["checksum"]) == (1, 10, 5, CK)
    before = dump(store)
    raises(Code.CONFLICT, ns.install_version, f, 11, base_version=0, if_version=True,
           size=1, checksum=CK, replicas=[1], mtime_ns=None, now_ns=NOW)
    assert dump(store) == before
    b = ns.install_version(f, 12, base_version=0, if_version=False, size=6, checksum=CK,
                           replicas=[2, 3, 4], mtime_ns=None, now_ns=NOW + 1)
    assert (b["version"], b["blob"], b["replicas"]) == (2, 12, [2, 3, 4]), "last committer wins"
    assert gc_entries(store) == [(NOW + 1 + GRACE, n, 10) for n in (1, 2, 3)]
    ns.unlink(ROOT_INO, b"f", NOW)
    raises(Code.ENOENT, ns.install_version, f, 13, base_version=2, if_version=True, size=1,
           checksum=CK, replicas=[1], mtime_ns=None, now_ns=NOW)
    raises(Code.EISDIR, ns.install_version, ROOT_INO, 14, base_version=None, if_version=False,
           size=1, checksum=CK, replicas=[1], mtime_ns=None, now_ns=NOW)


# ---------------------------------------------------------------- txn log


def test_txid_leases_survive_reopen_without_reuse(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m")
    log = Sync(s, s.txnlog)
    first = log.lease(100)
    second = log.lease(100)
    assert first[1] == second[0] and first[0] >= 1
    s.close()
    s = open_store(tmp_path / "m")
    third = Sync(s, s.txnlog).lease(100)
    assert third[0] >= second[1], "a restart never hands out a leased txid again"
    s.close()


def test_commit_records_ack_to_ended_and_purge(store: MetaStore) -> None:
    log = Sync(store, store.txnlog)
    for txid in (5, 6, 7):
        log.record_commit(TxnRecord(txid, TxnState.COMMITTED, 2, [1, 2, 3], 10, CK, 0,
                                    decided_ns=NOW))
    assert [r.txid for r in log.pending()] == [5, 6, 7]
    assert log.ack(5, [1, 9], NOW).acked == [1], "acks from non-replicas are ignored"
    assert log.ack(5, [2, 3], NOW + 1).state is TxnState.ENDED
    log.end(6, NOW + 50)
    assert [r.txid for r in log.pending()] == [7]
    assert log.get(5).ended_ns == NOW + 1
    assert log.get(99) is None
    assert log.purge_ended(NOW + 10, 100) == 1, "only records ended before the cutoff go"
    assert log.get(5) is None and log.get(6) is not None and log.get(7) is not None


# ---------------------------------------------------------------- node table


def test_node_ids_are_assigned_at_first_registration_and_persist(tmp_path: Path) -> None:
    s = open_store(tmp_path / "m")
    nodes = Sync(s, s.nodes)
    a = nodes.register(0, "h:1", 100, 1, NOW)
    b = nodes.register(0, "h:2", 100, 2, NOW)
    assert (a.id, b.id) == (1, 2) and a.state is NodeState.UP
    assert nodes.register(1, "h:9", 200, 3, NOW).address == "h:9"
    assert nodes.register(7, "h:7", 1, 1, NOW).id == 7, "an unknown id is adopted"
    assert nodes.register(0, "h:8", 1, 1, NOW).id == 8, "and never handed out again"
    nodes.set_state(2, NodeState.DRAINING)
    nodes.set_state(7, NodeState.REMOVED)
    raises(Code.ENOENT, nodes.set_state, 42, NodeState.DRAINING)
    raises(Code.EPERM, nodes.register, 7, "h:7", 1, 1, NOW)
    s.close()
    s = open_store(tmp_path / "m")
    table = {r.id: r for r in s.db.read(s.nodes.all)}
    assert table[1].address == "h:9" and table[1].capacity == 200
    assert table[2].state is NodeState.DRAINING and table[7].state is NodeState.REMOVED
    s.close()


# ---------------------------------------------------------------- gc queue


def test_gc_queue_due_in_time_order_with_limit_postpone_and_remove(store: MetaStore) -> None:
    gc = Sync(store, store.gc)
    gc.add(300, 1, 30)
    gc.add(100, 2, 10)
    gc.add(200, 1, 20)
    assert [e.blob for e in gc.due(250, 10)] == [10, 20]
    assert [e.blob for e in gc.due(250, 1)] == [10]
    assert gc.due(50, 10) == []
    first = gc.due(1000, 10)[0]
    gc.postpone([first], 400)
    assert [e.blob for e in gc.due(1000, 10)] == [20, 30, 10]
    assert gc.remove(gc.due(1000, 2)) == 2
    assert [e.blob for e in gc.due(1000, 10)] == [10]
    assert gc.count() == 1


# ---------------------------------------------------------------- the blob index


def test_blob_index_names_the_current_blob_and_is_built_for_old_metadata(
        tmp_path: Path) -> None:
    """OUTCOME, blob_refs and the GC ask the index whether a blob is current, long after its
    txn record was purged; it follows install_version, truncate and unlink."""
    store = open_store(tmp_path / "meta")
    ns = Sync(store, store.namespace)
    inodes = store.namespace.inodes

    def current(blob: int) -> int | None:
        inode = store.db.read(lambda t: inodes.current(t, blob))
        return None if inode is None else inode.ino

    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    g = ns.create(ROOT_INO, b"g", 0o644, 0, 0, NOW)["ino"]
    for ino, blob in ((f, 7), (f, 8), (g, 9)):
        ns.install_version(ino, blob, base_version=None, if_version=False, size=1,
                           checksum=CK, replicas=[1], mtime_ns=None, now_ns=NOW)
    assert (current(7), current(8), current(9)) == (None, f, g)
    ns.setattr(g, {"size": 0}, NOW)
    assert current(9) is None
    ns.install_version(g, 10, base_version=None, if_version=False, size=1, checksum=CK,
                       replicas=[1], mtime_ns=None, now_ns=NOW)
    ns.unlink(ROOT_INO, b"g", NOW)
    assert current(10) is None
    # Metadata written before the index existed: the index is built at the next open.
    store.db.write_now(lambda t: (t.drop(store.db["blobs"], delete=False),
                                  t.delete(b"blob_index", db=store.db["meta"])))
    assert current(8) is None
    store.close()
    store = open_store(tmp_path / "meta")
    inodes = store.namespace.inodes
    assert current(8) == f and current(10) is None
    store.close()
