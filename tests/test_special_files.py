"""FIFOs, sockets and device nodes in the namespace: metadata-only inodes with a device number,
and the set-ID rule of `setattr kill_suid` (on real LMDB)."""

from __future__ import annotations

import io
import os
import stat

import pytest
import trio
from cluster import Cluster
from meta_helpers import NOW, Sync, dump

from dfs.errors import Code, DfsError
from dfs.meta import ROOT_INO, MetaStore


def test_special_nodes_keep_type_mode_and_device_number(store: MetaStore, ns: Sync) -> None:
    made = {
        b"fifo": ns.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o640, 0, 7, 8, NOW),
        b"sock": ns.mknod(ROOT_INO, b"sock", stat.S_IFSOCK | 0o755, 0, 7, 8, NOW),
        b"chr": ns.mknod(ROOT_INO, b"chr", stat.S_IFCHR | 0o600, os.makedev(1, 3), 0, 0, NOW),
        b"blk": ns.mknod(ROOT_INO, b"blk", stat.S_IFBLK | 0o660, os.makedev(259, 70000),
                         0, 6, NOW),
    }
    assert made[b"fifo"]["mode"] == stat.S_IFIFO | 0o640 and made[b"fifo"]["rdev"] == 0
    assert made[b"fifo"]["uid"] == 7 and made[b"fifo"]["gid"] == 8
    rdev = store.db.read(lambda t: store.namespace.lookup(t, ROOT_INO, b"blk"))["rdev"]
    assert (os.major(rdev), os.minor(rdev)) == (259, 70000)
    listed = store.db.read(lambda t: store.namespace.readdir(t, ROOT_INO, 0, 10))
    assert {name: (a["mode"], a["rdev"], a["blob"], a["size"]) for name, _, a in listed} == {
        name: (a["mode"], a["rdev"], None, 0) for name, a in made.items()
    }
    # Links, renames and removal work as for any non-directory.
    ns.link(made[b"chr"]["ino"], ROOT_INO, b"chr2", NOW)
    ns.rename(ROOT_INO, b"chr2", ROOT_INO, b"null", 0, NOW)
    null = store.db.read(lambda t: store.namespace.lookup(t, ROOT_INO, b"null"))
    assert null["nlink"] == 2 and null["rdev"] == os.makedev(1, 3)
    for name in (b"fifo", b"sock", b"chr", b"null", b"blk"):
        ns.unlink(ROOT_INO, name, NOW)
    assert store.db.read(lambda t: store.namespace.readdir(t, ROOT_INO, 0, 10)) == []
    assert store.db.read(store.gc.all) == [], "no blob, nothing to collect"


@pytest.mark.parametrize(("mode", "rdev", "code"), [
    (stat.S_IFREG | 0o644, 0, Code.EINVAL),  # create makes files
    (0o644, 0, Code.EINVAL),                 # no type at all
    (stat.S_IFDIR | 0o755, 0, Code.EINVAL),  # mkdir makes directories
    (stat.S_IFLNK | 0o777, 0, Code.EINVAL),  # symlink makes symlinks
    (0o170000 | 0o644, 0, Code.EINVAL),      # not a type
    (stat.S_IFIFO | 0o644, 5, Code.EINVAL),  # only devices have a device number
    (stat.S_IFCHR | 0o644, 1 << 64, Code.EINVAL),
])
def test_bad_mknod_is_refused_and_writes_nothing(store: MetaStore, ns: Sync, mode: int,
                                                 rdev: int, code: Code) -> None:
    before = dump(store)
    with pytest.raises(DfsError) as info:
        ns.mknod(ROOT_INO, b"x", mode, rdev, 0, 0, NOW)
    assert info.value.code is code
    assert dump(store) == before


def test_mknod_over_an_existing_name_is_eexist(ns: Sync) -> None:
    ns.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, 0, 0, NOW)
    with pytest.raises(DfsError) as info:
        ns.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, 0, 0, NOW)
    assert info.value.code is Code.EEXIST


def test_special_nodes_have_no_content_to_truncate(ns: Sync) -> None:
    fifo = ns.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, 0, 0, NOW)
    with pytest.raises(DfsError) as info:
        ns.setattr(fifo["ino"], {"size": 0}, NOW)
    assert info.value.code is Code.EINVAL
    assert ns.setattr(fifo["ino"], {"mode": 0o600}, NOW)["mode"] == stat.S_IFIFO | 0o600


@pytest.mark.parametrize(("before", "after"), [
    (0o6755, 0o0755),  # set-user-ID goes; set-group-ID with group-execute too
    (0o6745, 0o2745),  # set-group-ID without group-execute marks locking: it stays
    (0o4644, 0o0644),
    (0o2775, 0o0775),
    (0o1755, 0o1755),  # sticky is no privilege
    (0o0644, 0o0644),
])
def test_kill_suid_drops_set_id_bits_like_linux(ns: Sync, before: int, after: int) -> None:
    f = ns.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 1000, 1000, NOW)
    ns.setattr(f["ino"], {"mode": before}, NOW)
    attr = ns.setattr(f["ino"], {"kill_suid": 1}, NOW + 5)
    assert attr["mode"] == stat.S_IFREG | after
    assert attr["ctime_ns"] == NOW + 5


# ---------------------------------------------------------------- over the wire


def test_mknod_and_kill_suid_over_the_wire(shared_cluster: Cluster) -> None:
    async def go() -> None:
        async with shared_cluster.client() as c:
            root = await c.resolve("/")
            dev = await c.mknod(root.ino, b"wire-tty", stat.S_IFCHR | 0o620, 5, 6,
                                os.makedev(4, 1))
            assert dev.kind == "char-device" and dev.rdev == os.makedev(4, 1)
            assert (await c.resolve("/wire-tty")).to_json()["major"] == 4
            with pytest.raises(DfsError) as info:
                await c.mknod(root.ino, b"wire-file", stat.S_IFREG | 0o644, 0, 0)
            assert info.value.code is Code.EINVAL and "create makes files" in str(info.value)
            with pytest.raises(DfsError) as info:  # a device has no content to write
                await c.write_file(dev.ino, io.BytesIO(b"data"))
            assert info.value.code is Code.EINVAL
            f = await c.create(root.ino, b"wire-suid", stat.S_IFREG | 0o6755, 0, 0)
            assert (await c.setattr(f.ino, kill_suid=True)).mode == stat.S_IFREG | 0o755
            await c.unlink(root.ino, b"wire-tty")
            await c.unlink(root.ino, b"wire-suid")

    trio.run(go)
