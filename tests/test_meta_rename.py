"""Namespace rename (POSIX rename/renameat2) and readdir cookies, on real LMDB."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from meta_helpers import GRACE, NOW, Sync, dump, open_store

from dfs.errors import Code, DfsError
from dfs.meta import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, MetaStore

CK = b"\x07" * 16


def raises(code: Code, fn, *args) -> None:
    with pytest.raises(DfsError) as info:
        fn(*args)
    assert info.value.code is code, info.value


def names(ns: Sync, ino: int) -> list[bytes]:
    return sorted(e[0] for e in ns.readdir(ino, 0, 1000))


def tree(ns: Sync) -> tuple[int, int, int]:
    """/a/sub, /b; returns the inos of a, sub, b."""
    a = ns.mkdir(ROOT_INO, b"a", 0o755, 0, 0, NOW)["ino"]
    sub = ns.mkdir(a, b"sub", 0o755, 0, 0, NOW)["ino"]
    b = ns.mkdir(ROOT_INO, b"b", 0o755, 0, 0, NOW)["ino"]
    return a, sub, b


# ---------------------------------------------------------------- plain rename


def test_rename_within_and_across_directories(ns: Sync) -> None:
    a, sub, b = tree(ns)
    f = ns.create(a, b"f", 0o644, 0, 0, NOW)["ino"]
    ns.rename(a, b"f", a, b"g", 0, NOW + 1)
    assert names(ns, a) == [b"g", b"sub"] and ns.lookup(a, b"g")["ino"] == f
    assert ns.getattr(f)["ctime_ns"] == NOW + 1
    ns.rename(a, b"g", b, b"h", 0, NOW)
    assert names(ns, a) == [b"sub"] and ns.lookup(b, b"h")["ino"] == f
    assert ns.getattr(a)["nlink"] == 3 and ns.getattr(b)["nlink"] == 2, "files move no links"


def test_moving_a_directory_moves_its_dotdot_and_parent_links(ns: Sync) -> None:
    a, sub, b = tree(ns)
    ns.rename(a, b"sub", b, b"moved", 0, NOW)
    assert ns.getattr(a)["nlink"] == 2 and ns.getattr(b)["nlink"] == 3
    assert ns.resolve("/b/moved/..")["ino"] == b
    assert ns.getattr(ROOT_INO)["nlink"] == 4


def test_rename_onto_itself_or_another_hard_link_does_nothing(store: MetaStore,
                                                              ns: Sync) -> None:
    f = ns.create(ROOT_INO, b"f", 0o644, 0, 0, NOW)["ino"]
    ns.link(f, ROOT_INO, b"g", NOW)
    before = dump(store)
    ns.rename(ROOT_INO, b"f", ROOT_INO, b"f", 0, NOW + 9)
    ns.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0, NOW + 9)
    assert dump(store) == before
    assert ns.getattr(f)["nlink"] == 2


def test_rename_replaces_a_file_target_atomically(store: MetaStore, ns: Sync) -> None:
    src = ns.create(ROOT_INO, b"new", 0o644, 0, 0, NOW)["ino"]
    dst = ns.create(ROOT_INO, b"old", 0o644, 0, 0, NOW)["ino"]
    ns.install_version(dst, 77, base_version=0, if_version=True, size=1, checksum=CK,
                       replicas=[1, 2], mtime_ns=None, now_ns=NOW)
    ns.rename(ROOT_INO, b"new", ROOT_INO, b"old", 0, NOW + 3)
    assert names(ns, ROOT_INO) == [b"old"] and ns.lookup(ROOT_INO, b"old")["ino"] == src
    raises(Code.ENOENT, ns.getattr, dst)
    assert [(e.node, e.blob, e.not_before_ns) for e in store.db.read(store.gc.all)] == [
        (1, 77, NOW + 3 + GRACE), (2, 77, NOW + 3 + GRACE)]


def test_replacing_a_hard_linked_target_only_drops_one_link(ns: Sync) -> None:
    src = ns.create(ROOT_INO, b"src", 0o644, 0, 0, NOW)["ino"]
    dst = ns.create(ROOT_INO, b"dst", 0o644, 0, 0, NOW)["ino"]
    ns.link(dst, ROOT_INO, b"other", NOW)
    ns.rename(ROOT_INO, b"src", ROOT_INO, b"dst", 0, NOW)
    assert ns.getattr(dst)["nlink"] == 1 and ns.lookup(ROOT_INO, b"dst")["ino"] == src


def test_rename_directory_over_directories(ns: Sync) -> None:
    a, sub, b = tree(ns)
    ns.create(b, b"f", 0o644, 0, 0, NOW)
    raises(Code.ENOTEMPTY, ns.rename, a, b"sub", ROOT_INO, b"b", 0, NOW)
    empty = ns.mkdir(ROOT_INO, b"empty", 0o755, 0, 0, NOW)["ino"]
    assert ns.getattr(ROOT_INO)["nlink"] == 5
    ns.rename(a, b"sub", ROOT_INO, b"empty", 0, NOW)
    raises(Code.ENOENT, ns.getattr, empty)
    assert ns.lookup(ROOT_INO, b"empty")["ino"] == sub
    assert ns.getattr(ROOT_INO)["nlink"] == 5, "one subdir replaced by another"
    assert ns.getattr(a)["nlink"] == 2


@pytest.mark.parametrize(
    "src, dst, code",
    [
        ("file", "dir", Code.EISDIR),
        ("dir", "file", Code.ENOTDIR),
        ("missing", "file", Code.ENOENT),
    ],
)
def test_rename_type_mismatches_change_nothing(store: MetaStore, ns: Sync, src: str,
                                               dst: str, code: Code) -> None:
    ns.create(ROOT_INO, b"file", 0o644, 0, 0, NOW)
    ns.mkdir(ROOT_INO, b"dir", 0o755, 0, 0, NOW)
    before = dump(store)
    raises(code, ns.rename, ROOT_INO, src.encode(), ROOT_INO, dst.encode(), 0, NOW)
    assert dump(store) == before


def test_a_directory_cannot_move_into_its_own_subtree(store: MetaStore, ns: Sync) -> None:
    a, sub, b = tree(ns)
    deep = ns.mkdir(sub, b"deep", 0o755, 0, 0, NOW)["ino"]
    ns.create(deep, b"x", 0o644, 0, 0, NOW)
    before = dump(store)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"a", a, b"x", 0, NOW)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"a", sub, b"x", 0, NOW)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"a", deep, b"y", 0, NOW)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"a", deep, b"x", RENAME_EXCHANGE, NOW)
    assert dump(store) == before
    ns.rename(a, b"sub", b, b"sub", 0, NOW)  # sideways is fine


def test_rename_noreplace(store: MetaStore, ns: Sync) -> None:
    ns.create(ROOT_INO, b"x", 0o644, 0, 0, NOW)
    ns.create(ROOT_INO, b"y", 0o644, 0, 0, NOW)
    before = dump(store)
    raises(Code.EEXIST, ns.rename, ROOT_INO, b"x", ROOT_INO, b"y", RENAME_NOREPLACE, NOW)
    assert dump(store) == before
    ns.rename(ROOT_INO, b"x", ROOT_INO, b"z", RENAME_NOREPLACE, NOW)
    assert names(ns, ROOT_INO) == [b"y", b"z"]


def test_rename_exchange_swaps_and_fixes_links(store: MetaStore, ns: Sync) -> None:
    a, sub, b = tree(ns)
    f = ns.create(b, b"f", 0o644, 0, 0, NOW)["ino"]
    ns.rename(a, b"sub", b, b"f", RENAME_EXCHANGE, NOW)
    assert ns.lookup(a, b"sub")["ino"] == f and ns.lookup(b, b"f")["ino"] == sub
    assert ns.getattr(a)["nlink"] == 2 and ns.getattr(b)["nlink"] == 3
    assert ns.resolve("/b/f/..")["ino"] == b
    raises(Code.ENOENT, ns.rename, a, b"sub", b, b"nope", RENAME_EXCHANGE, NOW)
    raises(Code.EINVAL, ns.rename, a, b"sub", b, b"f", RENAME_EXCHANGE | RENAME_NOREPLACE,
           NOW)


def test_rename_bad_names(ns: Sync) -> None:
    ns.create(ROOT_INO, b"x", 0o644, 0, 0, NOW)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"x", ROOT_INO, b"a/b", 0, NOW)
    raises(Code.EINVAL, ns.rename, ROOT_INO, b"x", ROOT_INO, b"..", 0, NOW)
    raises(Code.ENAMETOOLONG, ns.rename, ROOT_INO, b"x", ROOT_INO, b"n" * 256, 0, NOW)


# ---------------------------------------------------------------- readdir cookies


def test_readdir_pages_in_cookie_order(ns: Sync) -> None:
    for i in range(10):
        ns.create(ROOT_INO, b"f%d" % i, 0o644, 0, 0, NOW)
    seen: list[bytes] = []
    after = 0
    while page := ns.readdir(ROOT_INO, after, 3):
        assert len(page) <= 3
        cookies = [c for _, c, _ in page]
        assert cookies == sorted(cookies) and cookies[0] > after
        seen += [n for n, _, _ in page]
        after = cookies[-1]
    assert seen == [b"f%d" % i for i in range(10)]
    entry = ns.readdir(ROOT_INO, 0, 1)[0]
    assert entry[2]["ino"] == ns.lookup(ROOT_INO, entry[0])["ino"], "readdirplus attrs"
    raises(Code.ENOTDIR, ns.readdir, ns.lookup(ROOT_INO, b"f0")["ino"], 0, 10)
    assert ns.readdir(ROOT_INO, 2**64 - 1, 10) == []


def test_cookies_are_never_reused(ns: Sync) -> None:
    ns.create(ROOT_INO, b"a", 0o644, 0, 0, NOW)
    old = ns.readdir(ROOT_INO, 0, 10)[0][1]
    ns.unlink(ROOT_INO, b"a", NOW)
    ns.create(ROOT_INO, b"a", 0o644, 0, 0, NOW)
    assert ns.readdir(ROOT_INO, 0, 10)[0][1] > old


def test_readdir_resumes_stably_under_concurrent_create_and_delete(tmp_path: Path) -> None:
    """Every entry present for the whole listing is returned exactly once; nothing repeats."""
    rng = random.Random(7)
    for _ in range(5):
        store = open_store(tmp_path / f"m{rng.random()}")
        ns = Sync(store, store.namespace)
        initial = {b"n%03d" % i for i in range(60)}
        for name in sorted(initial):
            ns.create(ROOT_INO, name, 0o644, 0, 0, NOW)
        deleted: set[bytes] = set()
        created = 0
        seen: list[bytes] = []
        after = 0
        while page := ns.readdir(ROOT_INO, after, rng.randint(1, 7)):
            seen += [n for n, _, _ in page]
            after = page[-1][1]
            for _ in range(rng.randint(0, 4)):  # other clients change the directory
                if rng.random() < 0.5:
                    victim = rng.choice(sorted(initial - deleted))
                    ns.unlink(ROOT_INO, victim, NOW)
                    deleted.add(victim)
                else:
                    ns.create(ROOT_INO, b"new%03d" % created, 0o644, 0, 0, NOW)
                    created += 1
        assert len(seen) == len(set(seen)), "an entry was listed twice"
        assert initial - deleted <= set(seen), "a surviving entry was skipped"
        store.close()
