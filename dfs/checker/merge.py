"""The whole-cluster check's merge-join: the coordinator's files in blob id order against every
node's listing in blob id order, one window at a time.

Both sides are sorted by blob id (LMDB keys are u64 big-endian): the coordinator's `blobs`
index (`scan_blobs`) and each node's `blobs` table (`list`, paged with an `after` cursor). A
window is one coordinator page (files whose blob id is up to the page's last id); each node's
listing is read up to that id, a page at a time, all nodes at once. A node's record of a blob
in the window is either a copy the window's file lists (kept for judging, at most a page times
R) or an unreferenced candidate (handed on in bounded batches). What is held at once is one
coordinator page and at most one page per node: `peak_held` and `peak_stream` count it, so a
test can prove the bound rather than time RSS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dfs.checker.collect import LIST_PAGE
from dfs.checker.findings import Finding, Kind
from dfs.checker.scan import COMMITTED, STAGED, FileRow, NodeCopy, NodeView
from dfs.errors import DfsError

if TYPE_CHECKING:
    from dfs.checker.collect import Collector

END = 2**64 - 1
# Unreferenced candidates handed on for confirmation at once (a flush never waits for more).
CANDIDATE_BATCH = 10_000


@dataclass
class Window:
    """One coordinator page and what the listed nodes hold of its blobs."""

    files: list[FileRow]
    nodes: dict[int, NodeView]  # per window: `blobs` holds only this window's listed copies
    last: bool = False


@dataclass
class _Stream:
    """One node's listing, a page at a time."""

    node: NodeView
    rows: list[list[Any]] = field(default_factory=list)
    pos: int = 0
    after: int = 0
    done: bool = False
    failed: str = ""
    count: int = 0  # blobs listed so far

    @property
    def held(self) -> int:
        return len(self.rows) - self.pos


def candidate(node: int, blob: int, state: str, size: int | None) -> Finding:
    kind = {COMMITTED: Kind.ORPHAN, STAGED: Kind.STAGED}.get(state, Kind.PREPARED)
    what = f"{size} bytes" if size is not None else "size unknown"
    return Finding(kind, None, node, blob,
                   f"{state} blob {blob} ({what}) on node {node}: no file lists it")


class BlobMerge:
    def __init__(self, collector: Collector, nodes: dict[int, NodeView],
                 on_candidates: Callable[[list[Finding]], Awaitable[None]]) -> None:
        self.collector = collector
        self.nodes = nodes
        self.on_candidates = on_candidates
        self.streams = {n.id: _Stream(n) for n in nodes.values()
                        if n.state in ("up", "draining")}
        self.candidates: list[Finding] = []
        self.after = 0
        self.finished = False
        self.files_seen = 0
        self.peak_held = 0  # coordinator rows + node rows held at once
        self.peak_stream = 0  # the most rows any one stream held at once

    def listed(self, node_id: int) -> int:
        stream = self.streams.get(node_id)
        return stream.count if stream is not None else 0

    def failed(self, node_id: int) -> str:
        stream = self.streams.get(node_id)
        return stream.failed if stream is not None else ""

    async def next_window(self) -> Window | None:
        if self.finished:
            return None
        c = self.collector
        files, last = await c._timed("metadata", c.blob_files(self.after))
        self.files_seen += len(files)
        c.progress("metadata", self.files_seen, None)
        upper = END if last is None else last
        by_blob = {f.blob: f for f in files if f.blob is not None}
        copies: dict[int, dict[int, NodeCopy]] = {n: {} for n in self.streams}
        self._count(len(files))
        while True:
            for stream in self.streams.values():
                self._take(stream, upper, by_blob, copies[stream.node.id])
            if len(self.candidates) >= CANDIDATE_BATCH:
                batch, self.candidates = self.candidates, []
                await self.on_candidates(batch)
            need = [s for s in self.streams.values()
                    if not s.failed and not s.done and s.held == 0]
            if not need:
                break
            await c._timed("nodes", self._fetch(need))
            self._count(len(files))
        if last is None:
            self.finished = True
        else:
            self.after = last
        nodes = {}
        for n, view in self.nodes.items():
            stream = self.streams.get(n)
            listed = stream is not None and not stream.failed
            nodes[n] = NodeView(view.id, view.address, view.state,
                                copies[n] if listed else None, view.note)
        return Window(files, nodes, last=self.finished)

    async def flush(self) -> None:
        """Hand on the candidates still buffered (at the end of the merge)."""
        if self.candidates:
            batch, self.candidates = self.candidates, []
            await self.on_candidates(batch)

    def _count(self, files: int) -> None:
        held = files + sum(s.held for s in self.streams.values())
        self.peak_held = max(self.peak_held, held)
        self.peak_stream = max([self.peak_stream, files,
                                *(s.held for s in self.streams.values())])

    def _take(self, stream: _Stream, upper: int, by_blob: dict[int, FileRow],
              copies: dict[int, NodeCopy]) -> None:
        """Consume the stream's buffered rows up to `upper`: copies of this window's files,
        or unreferenced candidates."""
        rows, pos, node = stream.rows, stream.pos, stream.node.id
        while pos < len(rows) and rows[pos][0] <= upper:
            blob, state, size, checksum = rows[pos]
            pos += 1
            f = by_blob.get(blob)
            if f is not None and node in f.replicas:
                copies[blob] = (state, size, checksum)
            else:
                self.candidates.append(candidate(node, blob, state, size))
        if pos >= len(rows):
            stream.rows, stream.pos = [], 0  # the page is let go before the next is read
        else:
            stream.pos = pos

    async def _fetch(self, streams: list[_Stream]) -> None:
        c = self.collector

        async def one(stream: _Stream) -> None:
            try:
                rows = await c.list_page(stream.node, stream.after)
            except DfsError as e:
                stream.failed = e.msg
                stream.node.note = f"not listed: {e.msg}"
                return
            limit = min(c.page, LIST_PAGE)
            stream.rows, stream.pos = rows, 0
            stream.done = len(rows) < limit
            if rows:
                stream.after = rows[-1][0]
                stream.count += len(rows)
            c.progress("nodes", sum(s.count for s in self.streams.values()), None)

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(one, stream)

