"""The namespace side of a check in bounded memory: dangling entries, unnamed inodes, the
files under a PATH, and names for the findings kept for the report.

- Dangling entries and unnamed inodes (whole-cluster checks only) take one walk of the
  inodes (brief rows: ino, mode) and one of the entries per range of NAMESPACE_RANGE inode
  numbers, with a byte of flags per number of the range (exists, directory, named): memory is
  that fixed range, whatever the namespace holds; a namespace with more inode numbers takes
  more passes (the entries are walked once per range). Parents and children outside the
  range are looked up per page.
- Names: only for the findings kept in the report (`wanted`), captured during the entries
  walk; directories' paths come from their `parent` and one walk of the parent's entries.
- A PATH: its directories are walked entry page by entry page (`scan_dentries` within one
  directory), the files handed on in batches of a page.
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dfs.checker.findings import Finding, Kind
from dfs.checker.scan import ROOT_INO, FileRow

if TYPE_CHECKING:
    from dfs.checker.collect import Collector

NAMESPACE_RANGE = 1 << 22  # inode numbers per pass: one byte of flags each (4 MiB)
SUSPECT_BATCH = 10_000  # unnamed-inode suspicions confirmed by one second walk of the entries
MAX_DEPTH = 4096  # a directory chain longer than this (a loop) has no path
EXISTS, DIR, LINKED = 1, 2, 4
# flags -> 1 where an inode exists and no entry names it (EXISTS or EXISTS|DIR, not LINKED)
_UNNAMED = bytes(1 if v & (EXISTS | LINKED) == EXISTS else 0 for v in range(256))

Emit = Callable[[list[Finding]], Awaitable[None]]
FileBatch = Callable[[list[FileRow], dict[int, str]], Awaitable[None]]


class Namespace:
    def __init__(self, collector: Collector, emit: Emit) -> None:
        self.c = collector
        self.emit = emit
        self.names: dict[int, tuple[int, bytes]] = {}  # wanted ino -> its first entry
        self.dirs: dict[int, str | None] = {ROOT_INO: "/"}
        self.unindexed = 0  # files whose blob the `blobs` index does not name
        self.passes = 0

    async def check(self, wanted: set[int]) -> None:
        """Dangling entries and unnamed inodes, range by range; names for `wanted`."""
        lo = 0
        while True:
            flags = bytearray(NAMESPACE_RANGE)
            more = await self._inodes(lo, flags)
            await self._entries(lo, flags, wanted, first=lo == 0)
            await self._unnamed(lo, flags)
            self.passes += 1
            if not more:
                return
            lo += NAMESPACE_RANGE

    async def _inodes(self, lo: int, flags: bytearray) -> bool:
        """Flag the inodes of the range; whether inodes beyond it exist."""
        after = max(lo - 1, 0)
        while True:
            rows, last = await self.c._timed("metadata", self.c.brief_inodes(after))
            for ino, mode, indexed in rows:
                if ino >= lo + NAMESPACE_RANGE:
                    return True
                flags[ino - lo] = EXISTS | (DIR if stat.S_ISDIR(mode) else 0)
                self.unindexed += not indexed
            if last is None:
                return False
            after = last

    async def _entries(self, lo: int, flags: bytearray, wanted: set[int], first: bool) -> None:
        hi = lo + NAMESPACE_RANGE
        after = b""
        while True:
            rows, last = await self.c._timed("metadata", self.c.entries_page(after))
            outside = {p for p, _, _ in rows if not lo <= p < hi}
            if first:
                outside |= {i for _, _, i in rows if not lo <= i < hi}
            kinds = await self.c.fresh_inodes(sorted(outside)) if outside else {}

            def kind(ino: int, kinds: dict[int, FileRow | None] = kinds) -> int:
                if lo <= ino < hi:
                    return flags[ino - lo]
                row = kinds.get(ino)
                return 0 if row is None else EXISTS | (DIR if row.is_dir else 0)

            suspects: list[Finding] = []
            for parent, name, ino in rows:
                if kind(parent) & (EXISTS | DIR) != EXISTS | DIR:
                    if first:
                        suspects.append(Finding(Kind.DANGLING, ino, parent=parent, name=name,
                                                detail=f"entry in missing directory {parent}"))
                    continue
                if lo <= ino < hi:
                    if not flags[ino - lo] & EXISTS:
                        suspects.append(Finding(Kind.DANGLING, ino, parent=parent, name=name,
                                                detail=f"names inode {ino}, which is gone"))
                        continue
                    flags[ino - lo] |= LINKED
                elif first and not kind(ino) & EXISTS:
                    suspects.append(Finding(Kind.DANGLING, ino, parent=parent, name=name,
                                            detail=f"names inode {ino}, which is gone"))
                    continue
                if first and ino in wanted:
                    self.names.setdefault(ino, (parent, name))
            if suspects:
                await self.emit(await self.c._timed("confirm", self.c.dangling(suspects)))
            if last is None:
                return
            after = last

    async def _unnamed(self, lo: int, flags: bytearray) -> None:
        marks = flags.translate(_UNNAMED)
        batch: list[Finding] = []
        at = marks.find(1)
        while at >= 0:
            ino = lo + at
            if ino != ROOT_INO:
                batch.append(Finding(Kind.UNLINKED, ino, detail="no directory entry names it"))
            if len(batch) >= SUSPECT_BATCH:
                await self.emit(await self.c._timed("confirm", self.c.unlinked(batch)))
                batch = []
            at = marks.find(1, at + 1)
        if batch:
            await self.emit(await self.c._timed("confirm", self.c.unlinked(batch)))

    # ------------------------------------------------------------ names

    async def path(self, f: Finding) -> str | None:
        if f.kind is Kind.DANGLING:
            parent = await self.dir_path(f.parent or 0)
            if parent is None or f.name is None:
                return None
            return join(parent, f.name)
        if f.ino is None or f.ino not in self.names:
            return "/" if f.ino == ROOT_INO else None
        parent_ino, name = self.names[f.ino]
        parent = await self.dir_path(parent_ino)
        return None if parent is None else join(parent, name)

    async def dir_path(self, ino: int, depth: int = 0) -> str | None:
        if ino in self.dirs:
            return self.dirs[ino]
        path: str | None = None
        row = (await self.c.fresh_inodes([ino])).get(ino)
        if row is not None and row.is_dir and depth < MAX_DEPTH:
            name = await self._name_in(row.parent, ino)
            if name is not None:
                parent = await self.dir_path(row.parent, depth + 1)
                path = None if parent is None else join(parent, name)
        self.dirs[ino] = path
        return path

    async def _name_in(self, parent: int, ino: int) -> bytes | None:
        after = b""
        while True:
            rows, last = await self.c.entries_page(after, within=parent)
            for _, name, child in rows:
                if child == ino:
                    return name
            if last is None:
                return None
            after = last


async def walk_subtree(c: Collector, top: FileRow, path: str, on_batch: FileBatch) -> None:
    """Hand on every regular file under `top` (or `top` itself), a page of them at a time,
    with their paths. Memory: a page of files, a page of entries, and the directories still to
    walk (the stack of a depth-first walk)."""
    if not top.is_dir:
        if top.is_reg and top.blob is not None:
            await on_batch([top], {top.ino: path})
        return
    batch: list[FileRow] = []
    paths: dict[int, str] = {}
    todo = [(top.ino, path)]
    while todo:
        directory, where = todo.pop()
        after = b""
        while True:
            entries, last = await c._timed("metadata", c.entries_page(after, within=directory))
            rows = await c._timed("metadata", c.fresh_inodes([i for _, _, i in entries]))
            for _, name, ino in entries:
                row = rows.get(ino)
                if row is None:
                    continue
                if row.is_dir:
                    todo.append((ino, join(where, name)))
                elif row.is_reg and row.blob is not None and ino not in paths:
                    batch.append(row)
                    paths[ino] = join(where, name)
            if len(batch) >= c.page:
                await on_batch(batch, paths)
                batch, paths = [], {}
            if last is None:
                break
            after = last
    if batch:
        await on_batch(batch, paths)


def join(parent: str, name: bytes) -> str:
    return parent.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
