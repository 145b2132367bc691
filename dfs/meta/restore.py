"""`dfs snapshot restore PATH NAME`: make the live subtree at PATH what the snapshot holds, in
ONE transaction, so a reader sees the tree as it was before the restore or as the snapshot
has it, never a mix (docs/coordinator.md, "Snapshots").

A snapshot keeps its inodes' own numbers, and inode numbers are never reused, so restoring is
reconciling two trees of the same inodes: entries the snapshot lacks go, entries it has come
back, a file whose blob differs gets the snapshot's blob as a new version (no data copied:
the blob is its own old one, held by the snapshot, so never collected), a file or directory
deleted since is recreated under its old number, attributes and xattrs are the snapshot's.
What the restore replaces is kept as a version or collected, as any write's would be.

Refused with CONFLICT (nothing changed): an inode of the snapshot that now lives outside PATH
(moved out since): restoring it would give it a second place. Hard links between PATH and the
rest keep their outside names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lmdb

from dfs.errors import Code, DfsError
from dfs.meta.entries import Entry
from dfs.meta.record import Inode

if TYPE_CHECKING:
    from dfs.meta.namespace import Namespace
    from dfs.meta.snapshots import Snapshot

Key = tuple[int, bytes]  # (parent ino, name)


def _live_tree(ns: Namespace, txn: lmdb.Transaction, root: int
               ) -> tuple[dict[Key, Entry], dict[int, Inode]]:
    entries: dict[Key, Entry] = {}
    inodes: dict[int, Inode] = {root: ns.inodes.get_dir(txn, root)}
    todo = [root]
    while todo:
        directory = todo.pop()
        after = 0
        while True:
            page = ns.entries.list(txn, directory, after, 1024)
            for e in page:
                entries[(directory, e.name)] = e
                child = ns.inodes.find(txn, e.ino)
                if child is not None:
                    inodes[child.ino] = child
                    if child.is_dir:
                        todo.append(child.ino)
            if len(page) < 1024:
                break
            after = page[-1].cookie
    return entries, inodes


def _snapshot_tree(ns: Namespace, txn: lmdb.Transaction, snap: Snapshot
                   ) -> tuple[dict[Key, int], dict[int, Inode]]:
    entries: dict[Key, int] = {}
    inodes: dict[int, Inode] = {}
    todo = [snap.root]
    while todo:
        directory = todo.pop()
        inode = ns.snapshots.inode(txn, snap.id, directory)
        if inode is None:
            continue
        inodes[directory] = inode
        after = 0
        while True:
            page = list(ns.snapshots.entries(txn, snap.id, directory, after, 1024))
            for name, _cookie, child in page:
                entries[(directory, name)] = child
                record = ns.snapshots.inode(txn, snap.id, child)
                if record is None:
                    continue
                if record.is_dir:
                    todo.append(child)
                else:
                    inodes[child] = record
            if len(page) < 1024:
                break
            after = page[-1][1]
    return entries, inodes


def restore_snapshot(ns: Namespace, txn: lmdb.Transaction, snap: Snapshot, now_ns: int
                     ) -> dict[str, int]:
    """Reconcile the live subtree with the snapshot (see the module doc); counts of what
    changed."""
    live_entries, live = _live_tree(ns, txn, snap.root)
    want_entries, want = _snapshot_tree(ns, txn, snap)
    for ino in want:
        if ino not in live and ns.inodes.find(txn, ino) is not None:
            raise DfsError(Code.CONFLICT, f"inode {ino} of the snapshot was moved out of "
                                          f"{snap.path} since: move it back, then restore")
    counts = {"removed": 0, "added": 0, "rewritten": 0, "recreated": 0}
    links: dict[int, int] = {ino: inode.nlink for ino, inode in live.items()}
    # 1. Entries the snapshot does not have (or has for another inode) go.
    for key, entry in live_entries.items():
        if want_entries.get(key) != entry.ino:
            ns.entries.remove(txn, entry)
            links[entry.ino] = links.get(entry.ino, 1) - 1
            counts["removed"] += 1
    # 2. Inodes: the snapshot's attributes and content; recreated where deleted since.
    final: dict[int, Inode] = {}
    for ino, record in want.items():
        current = live.get(ino)
        if current is None:
            inode = Inode.decode(ino, record.encode())
            if inode.is_dir:
                inode.next_cookie = max(inode.next_cookie, 3)
            if inode.is_reg:
                ns.inodes.index_blob(txn, inode)
            links[ino] = 0
            counts["recreated"] += 1
        else:
            inode = current
            if inode.is_reg and inode.blob != record.blob:
                ns.inodes.supersede(txn, inode, ns.keep_for(txn, inode), now_ns)
                inode.blob, inode.size = record.blob, record.size
                inode.checksum, inode.replicas = record.checksum, list(record.replicas)
                inode.version += 1
                ns.inodes.index_blob(txn, inode)
                counts["rewritten"] += 1
            inode.mode, inode.uid, inode.gid = record.mode, record.uid, record.gid
            inode.xattrs = dict(record.xattrs)
            inode.mtime_ns = record.mtime_ns
            inode.target, inode.rdev = record.target, record.rdev
            if inode.is_dir and ino != snap.root:
                inode.parent = record.parent
        inode.ctime_ns = now_ns
        final[ino] = inode
    # 3. Entries the live tree lacks come back (directories exist by now: step 2).
    for (parent, name), ino in want_entries.items():
        if ino not in final or parent not in final:
            continue
        existing = live_entries.get((parent, name))
        if existing is not None and existing.ino == ino:
            continue
        ns.entries.add(txn, final[parent], name, ino)
        links[ino] = links.get(ino, 0) + 1
        counts["added"] += 1
    # 4. Link counts; what nothing names any more is deleted.
    subdirs: dict[int, int] = {}
    for (parent, _), ino in want_entries.items():
        if ino in final and final[ino].is_dir:
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for ino, inode in final.items():
        inode.nlink = 2 + subdirs.get(ino, 0) if inode.is_dir else max(1, links.get(ino, 1))
        ns.inodes.put(txn, inode)
    for ino, inode in live.items():
        if ino in final:
            continue
        if inode.is_dir:
            ns.inodes.delete_dir(txn, inode)
        elif links.get(ino, 0) <= 0:
            inode.nlink = 1
            ns.inodes.drop_link(txn, inode, now_ns)
        else:
            inode.nlink = links[ino]  # it keeps names outside PATH
            ns.inodes.put(txn, inode)
    return counts
