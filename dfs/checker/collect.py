"""Requests a check makes, each a page or a batch, and the confirmation of what it suspects.

The cost of a check is a few round trips per thousands of files: the coordinator's tables come
in pages of `CHECK_PAGE`; each node lists its blobs in pages (merge.py reads them window by
window); `--deep` asks each node to re-hash many blobs per request (in a worker thread on the
node). No request is made per file, and no request or reply holds more than a page.

The pages are not one snapshot, so everything suspected is confirmed before it is reported:
replica findings against a fresh read of those inodes and a fresh `stat` of those copies;
unreferenced blobs against the GC queue, then the node, then `blob_refs` (in flight? listed
after all?); namespace findings with fresh reads and a second walk of the entries
(docs/checker.md).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from dfs.checker.findings import BAD_COPY, Finding, Kind
from dfs.checker.scan import PREPARED, STAGED, FileRow, NodeView
from dfs.errors import DfsError

if TYPE_CHECKING:
    from dfs.client import Client

ProgressFn = Callable[[str, int, int | None], None]
# Entries per page of every walk (coordinator and nodes): what a check holds at once is
# about a page per stream (docs/checker.md, "Memory").
CHECK_PAGE = 10_000
LIST_PAGE = 10_000  # the node's own cap on a `list` page (storage_node MAX_LIST)
ID_BATCH = 10_000
VERIFY_BYTES = 64 * 1024 * 1024
VERIFY_BLOBS = 2000
VERIFY_IN_FLIGHT = 2  # requests per node
NODE_TIMEOUT = 60.0
RETRY_FOR = 3.0  # node reads are idempotent: retried on network errors this long


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


def page_size(override: int | None = None) -> int:
    """Entries per page of every walk: CHECK_PAGE, or a smaller one for tests
    (`--page-size`, or DFS_CHECK_PAGE in the environment)."""
    value = override or int(os.environ.get("DFS_CHECK_PAGE") or CHECK_PAGE)
    return max(1, min(value, CHECK_PAGE))


class Collector:
    def __init__(self, client: Client, progress: ProgressFn | None = None,
                 page: int | None = None) -> None:
        self.client = client
        self.page = page_size(page)
        self.progress = progress or _no_progress
        self.timings: dict[str, float] = {}
        # node id -> (copies not re-hashed, why): a node that failed `verify` (down since it
        # was listed) costs a note, never the check.
        self.unverified: dict[int, tuple[int, str]] = {}

    async def _timed(self, phase: str, coro: Any) -> Any:
        start = time.monotonic()
        try:
            return await coro
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - start

    # ------------------------------------------------------------ the coordinator

    async def blob_files(self, after: int) -> tuple[list[FileRow], int | None]:
        """A page of files in current blob id order, and the blob id to continue after."""
        reply = await self.client.query("scan_blobs", after=after, limit=self.page)
        return [FileRow.from_wire(r) for r in reply["inodes"]], reply.get("last")

    async def brief_inodes(self, after: int) -> tuple[list[list[Any]], int | None]:
        """A page of [ino, mode, indexed] in ino order, and the ino to continue after."""
        reply = await self.client.query("scan_inodes", after=after, limit=self.page,
                                        brief=True)
        return reply["inodes"], reply.get("last")

    async def entries_page(self, after: bytes, within: int | None = None
                           ) -> tuple[list[tuple[int, bytes, int]], bytes | None]:
        fields: dict[str, Any] = {} if within is None else {"within": within}
        reply = await self.client.query("scan_dentries", after=after, limit=self.page,
                                        **fields)
        return [(p, n, i) for p, n, i in reply["entries"]], reply.get("last")

    async def not_queued(self, pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """Those of `pairs` (node, blob) the GC queue does not hold: one paged walk of the
        queue, holding a page of it at a time."""
        left = set(pairs)
        after = b""
        while left:
            reply = await self.client.query("scan_gc", after=after, limit=self.page)
            left.difference_update((n, b) for n, b in reply["entries"])
            if reply.get("last") is None:
                break
            after = reply["last"]
        return left

    async def fresh_inodes(self, inos: list[int]) -> dict[int, FileRow | None]:
        out: dict[int, FileRow | None] = {}
        for i in range(0, len(inos), ID_BATCH):
            batch = inos[i:i + ID_BATCH]
            rows = (await self.client.query("inodes", inos=batch))["inodes"]
            out.update((ino, None if row is None else FileRow.from_wire(row))
                       for ino, row in zip(batch, rows, strict=True))
        return out

    # ------------------------------------------------------------ the nodes

    async def list_page(self, node: NodeView, after: int) -> list[list[Any]]:
        """Up to a page of the node's blobs with id > after, in id order."""
        reply = await self.client.peers[node.address].call(
            "list", after=after, limit=min(self.page, LIST_PAGE), timeout=NODE_TIMEOUT,
            retry_for=RETRY_FOR)
        return reply["blobs"]

    async def stat_copies(self, node: NodeView, blobs: list[int]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for i in range(0, len(blobs), ID_BATCH):
            reply = await self.client.peers[node.address].call(
                "stat", blobs=blobs[i:i + ID_BATCH], timeout=NODE_TIMEOUT, retry_for=RETRY_FOR)
            out.update(reply["blobs"])
        return out

    async def verify(self, nodes: Mapping[int, NodeView], files: list[FileRow],
                     skip: set[tuple[int, int]]) -> dict[tuple[int, int], Any]:
        """Every listed copy of `files` re-read and re-hashed by its node, many per request."""
        work: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for f in files:
            for n in dict.fromkeys(f.replicas):
                node = nodes.get(n)
                copy = (node.blobs or {}).get(f.blob or 0) if node else None
                if copy is not None and copy[0] != STAGED and (n, f.blob) not in skip:
                    work[n].append((f.blob or 0, f.size))
        total = sum(size for items in work.values() for _, size in items)
        done = [0]
        verdicts: dict[tuple[int, int], Any] = {}
        self.progress("verify", 0, total)

        async def batch(node: NodeView, items: list[tuple[int, int]], limit: trio.Semaphore
                        ) -> None:
            async with limit:
                size = sum(s for _, s in items)
                try:
                    reply = await self.client.peers[node.address].call(
                        "verify", blobs=[b for b, _ in items],
                        timeout=NODE_TIMEOUT + size / 20e6, retry_for=RETRY_FOR)
                except DfsError as e:
                    count, _ = self.unverified.get(node.id, (0, ""))
                    self.unverified[node.id] = (count + len(items), e.msg)
                    return
                for blob, verdict in reply["results"].items():
                    verdicts[(node.id, int(blob))] = verdict
                done[0] += size
                self.progress("verify", done[0], total)

        async with trio.open_nursery() as nursery:
            for n, items in work.items():
                node = nodes[n]
                limit = trio.Semaphore(VERIFY_IN_FLIGHT)
                for group in _batches(sorted(items)):
                    nursery.start_soon(batch, node, group, limit)
        return verdicts

    # ------------------------------------------------------------ confirmation

    async def confirm_replicas(self, findings: list[Finding], rows: Mapping[int, FileRow],
                               nodes: Mapping[int, NodeView], r: int) -> list[Finding]:
        """Drop findings about files that changed since they were read (`rows`), and copies
        that turned out fine on a second look (a commit or a repair was landing meanwhile)."""
        if not findings:
            return []
        fresh = await self.fresh_inodes(sorted({f.ino for f in findings if f.ino}))
        kept: list[Finding] = []
        restat: dict[int, set[int]] = defaultdict(set)
        for f in findings:
            old, new = rows.get(f.ino or 0), fresh.get(f.ino or 0)
            if old is None or new is None or (new.blob, new.version) != (old.blob, old.version):
                continue
            if f.node is not None and f.node not in new.replicas:
                continue  # the copy was moved off that node meanwhile
            if f.node is None and len(set(new.replicas)) >= r:
                continue
            kept.append(f)
            if f.kind in BAD_COPY and f.node is not None and f.kind is not Kind.CORRUPT:
                restat[f.node].add(f.blob or 0)
        now: dict[tuple[int, int], Any] = {}
        for n, blobs in restat.items():
            node = nodes.get(n)
            if node is None or not node.listed:
                continue
            try:
                for blob, info in (await self.stat_copies(node, sorted(blobs))).items():
                    now[(n, int(blob))] = info
            except DfsError:
                continue
        out = []
        for f in kept:
            info = now.get((f.node or 0, f.blob or 0))
            row = fresh[f.ino or 0]
            if (f.kind is not Kind.CORRUPT and info is not None and row is not None
                    and info.get("state") in ("COMMITTED", PREPARED)
                    and info.get("size") == row.size and info.get("checksum") == row.checksum):
                continue  # fine now
            out.append(f)
        return out

    async def confirm_blobs(self, candidates: list[Finding]
                            ) -> tuple[list[Finding], list[Finding]]:
        """Split blobs into those the coordinator still calls unreferenced (not in flight, not
        listed) and those it has in flight; listed ones are dropped."""
        out: list[Finding] = []
        inflight: list[Finding] = []
        for i in range(0, len(candidates), ID_BATCH):
            batch = candidates[i:i + ID_BATCH]
            refs = (await self.client.query(
                "blob_refs", blobs=[[f.node, f.blob] for f in batch]))["refs"]
            for f, ref in zip(batch, refs, strict=True):
                if ref == "unreferenced":
                    out.append(f)
                elif ref == "inflight":
                    inflight.append(f)
        return out, inflight

    async def restat(self, nodes: Mapping[int, NodeView], candidates: list[Finding]
                     ) -> tuple[list[Finding], dict[tuple[int, int], dict[str, Any]]]:
        """Each unreferenced candidate's record on its node now (after the GC queue was read):
        the candidates still there (a node that cannot say keeps its candidates), and their
        records, with how long a STAGED/PREPARED one has been idle there and the node's
        cleanup horizon for it."""
        by_node: dict[int, list[int]] = defaultdict(list)
        for f in candidates:
            by_node[f.node or 0].append(f.blob or 0)
        records: dict[tuple[int, int], dict[str, Any]] = {}
        unknown: set[int] = set()

        async def one(node: NodeView, blobs: list[int]) -> None:
            try:
                infos = await self.stat_copies(node, blobs)
            except DfsError as e:
                node.note = node.note or f"leftovers not stated: {e.msg}"
                unknown.add(node.id)
                return
            records.update(((node.id, int(b)), info) for b, info in infos.items()
                           if info is not None)

        async with trio.open_nursery() as nursery:
            for node_id, blobs in by_node.items():
                node = nodes.get(node_id)
                if node is not None:
                    nursery.start_soon(one, node, blobs)
                else:
                    unknown.add(node_id)
        still = [f for f in candidates
                 if (f.node or 0, f.blob or 0) in records or f.node in unknown]
        return still, records

    async def dangling(self, findings: list[Finding]) -> list[Finding]:
        """Dangling-entry suspicions that still hold on fresh reads."""
        if not findings:
            return []
        out: list[Finding] = []
        inos = (await self.client.query(
            "entries", keys=[[f.parent, f.name] for f in findings]))["inos"]
        still = [f for f, ino in zip(findings, inos, strict=True) if ino == f.ino]
        fresh = await self.fresh_inodes(
            sorted({f.ino or 0 for f in still} | {f.parent or 0 for f in still}))
        for f in still:
            child, parent = fresh.get(f.ino or 0), fresh.get(f.parent or 0)
            if child is None or parent is None or not parent.is_dir:
                out.append(f)
        return out

    async def unlinked(self, findings: list[Finding]) -> list[Finding]:
        """Unnamed-inode suspicions (at most a batch) that still hold: the inode is there and
        a second walk of the entries names none of them."""
        if not findings:
            return []
        fresh = await self.fresh_inodes(sorted(f.ino or 0 for f in findings))
        suspects = {f.ino for f in findings if fresh.get(f.ino or 0) is not None}
        after = b""
        while suspects:
            rows, last = await self.entries_page(after)
            suspects.difference_update(ino for _, _, ino in rows)
            if last is None:
                break
            after = last
        return [f for f in findings if f.ino in suspects]


def _batches(items: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = []
    group: list[tuple[int, int]] = []
    size = 0
    for blob, s in items:
        if group and (size + s > VERIFY_BYTES or len(group) >= VERIFY_BLOBS):
            out.append(group)
            group, size = [], 0
        group.append((blob, s))
        size += s
    if group:
        out.append(group)
    return out
