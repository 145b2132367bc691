"""What the simulated users do, through the real client library, and what they saw.

Writers overwrite a few fixed files (half of the writes conditional on the version they read),
readers read them back, a churner creates, renames over and deletes other files (so unlinked
and superseded blobs are collected), and an operator runs `dfs check --deep --repair`,
drains and removes a node while the faults go on. Every write's content is unique, so a read
names the one write it came from, or proves a mix. The history is Jepsen's: each operation
is invoked, then ok, failed (certainly not applied) or info (unknown).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dfs.checker.run import run_check
from dfs.client import Attr, Client
from dfs.client.write import CommittedUnread
from dfs.errors import Code, DfsError
from dfs.sim.processes import COORDINATOR, SECRET
from dfs.sim.world import SimProcess, World

if TYPE_CHECKING:
    from dfs.sim.processes import SimNode

ROOT = 1
BIG_WRITE = 0.03  # share of writes bigger than one chunk (1 MiB)
CHURN_NAMES = 4


@dataclass
class Write:
    client: str
    ino: int
    content: bytes
    invoked: float
    completed: float = float("inf")
    outcome: str = "invoked"  # ok | failed | info
    version: int | None = None
    blob: int | None = None
    conditional: bool = False
    detail: str = ""
    group: int = 0  # a member of this multi-file transaction (0: a single write)


@dataclass
class Read:
    client: str
    ino: int
    invoked: float
    completed: float
    content: bytes
    version: int


@dataclass
class GroupRead:
    """Several files read at one decision point (`resolve_many`): ino -> (version, bytes)."""

    client: str
    invoked: float
    seen: dict[int, tuple[int, bytes]]


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    by_content: dict[bytes, Write] = field(default_factory=dict)
    churn: dict[str, int] = field(default_factory=dict)
    admin: dict[str, int] = field(default_factory=dict)
    groups: dict[int, list[Write]] = field(default_factory=dict)
    group_seq: int = 0
    group_reads: list[GroupRead] = field(default_factory=list)
    # Files a churner was creating that another client saw before their first content
    # (docs/design.md §6, "A new file appears with its content"): must stay empty.
    seen_unwritten: list[str] = field(default_factory=list)

    def count(self, table: dict[str, int], what: str) -> None:
        table[what] = table.get(what, 0) + 1


def _client() -> Client:
    return Client(COORDINATOR, SECRET, timeout=1.0, retry_for=3.0, commit_timeout=6.0,
                  attempts=4)


def _definitely_failed(e: DfsError) -> bool:
    """An error that proves the write was not applied (anything else leaves it unknown)."""
    return e.code is Code.CONFLICT or (
        e.code in (Code.UNAVAILABLE, Code.ENOSPC) and "failed after" in e.msg)


class SimUser(SimProcess):
    """One client host: a writer, a reader or a churner, by `role`."""

    crashable = True

    def __init__(self, world: World, name: str, role: str, files: list[int],
                 history: History, until: float) -> None:
        super().__init__(world, name)
        self.role = role
        self.files = files
        self.history = history
        self.until = until
        self.rng = random.Random(world.rng.random())
        self._seq = 0

    async def run(self) -> None:
        async with _client() as client:
            await trio.sleep(self.rng.uniform(0, 0.5))
            while trio.current_time() < self.until:
                try:
                    await getattr(self, "_" + self.role)(client)
                except DfsError:
                    pass  # recorded where it matters; the user tries again
                await trio.sleep(self.rng.uniform(0.01, 0.2))

    def content(self) -> bytes:
        self._seq += 1
        head = f"{self.name}:{self.incarnation}:{self._seq}:".encode()
        size = (1 << 20) + self.rng.randrange(100) if self.rng.random() < BIG_WRITE \
            else self.rng.randrange(0, 3000)
        return head + self.rng.randbytes(max(0, size - len(head)))

    async def _writer(self, client: Client) -> None:
        ino = self.rng.choice(self.files)
        attr = await client.getattr(ino)
        op = Write(self.name, ino, self.content(), trio.current_time(),
                   conditional=self.rng.random() < 0.5)
        self.history.writes.append(op)
        self.history.by_content[op.content] = op
        try:
            result = await client.write_file(ino, io.BytesIO(op.content),
                                             base_version=attr.version,
                                             if_version=op.conditional)
        except CommittedUnread as e:
            # Committed (OUTCOME said so), at a version the client could not read back.
            op.outcome, op.blob, op.detail = "ok", None, e.msg
            self.world.log(f"{self.name} write ino={ino} ok: {e.msg}")
        except DfsError as e:
            op.outcome = "failed" if _definitely_failed(e) else "info"
            op.detail = f"{e.code.value}: {e.msg}"
            self.world.log(f"{self.name} write ino={ino} {op.outcome}: {op.detail}")
        except BaseException:
            op.outcome = "info"  # this host crashed mid-write
            raise
        else:
            op.outcome, op.version, op.blob = "ok", result.version, result.blob
            self.world.log(f"{self.name} write ino={ino} ok: v{result.version} "
                           f"blob {result.blob}")
        op.completed = trio.current_time()

    async def _reader(self, client: Client) -> None:
        ino = self.rng.choice(self.files)
        invoked = trio.current_time()
        attr = await client.getattr(ino)
        sink = io.BytesIO()
        await client.read_file(attr, sink)
        self.history.reads.append(Read(self.name, ino, invoked, trio.current_time(),
                                       sink.getvalue(), attr.version))

    async def _grouper(self, client: Client) -> None:
        """Half the time one transaction over 2-3 of the shared files (each member
        conditional on the version read, 30% of the time); else all of them read at one
        decision point."""
        paths = {ino: f"/f{i}" for i, ino in enumerate(self.files)}
        if self.rng.random() < 0.5:
            await self._read_group(client, paths)
            return
        chosen = self.rng.sample(self.files, self.rng.randint(2, min(3, len(self.files))))
        conditional = self.rng.random() < 0.3
        members: list[Write] = []
        t = client.transaction()
        for ino in chosen:
            attr = await client.getattr(ino)
            op = Write(self.name, ino, self.content(), trio.current_time(),
                       conditional=conditional)
            members.append(op)
            t.write(paths[ino], op.content, if_version=attr.version if conditional else None)
        self.history.group_seq += 1
        gid = self.history.group_seq
        self.history.groups[gid] = members
        for op in members:
            op.group = gid
            self.history.writes.append(op)
            self.history.by_content[op.content] = op
        try:
            attrs = await t.commit()
        except DfsError as e:
            outcome = "failed" if _definitely_failed(e) else "info"
            for op in members:
                op.outcome, op.detail = outcome, f"{e.code.value}: {e.msg}"
            self.world.log(f"{self.name} group {gid} {outcome}: {e.code.value}: {e.msg}")
        except BaseException:
            for op in members:
                op.outcome = "info"
            raise
        else:
            for op in members:
                if t.settled_by_outcome:
                    # Settled by OUTCOME: committed, at versions the client does not know
                    # (the attrs are the files' versions now, maybe later writes').
                    op.outcome, op.blob = "ok", None
                    continue
                attr = attrs[paths[op.ino]]
                op.outcome, op.version, op.blob = "ok", attr.version, attr.blob
            self.world.log(f"{self.name} group {gid} ok: {len(members)} files")
        now = trio.current_time()
        for op in members:
            op.completed = now

    async def _read_group(self, client: Client, paths: dict[int, str]) -> None:
        invoked = trio.current_time()
        reply = await client.query("resolve_many", paths=list(paths.values()))
        seen: dict[int, tuple[int, bytes]] = {}
        for ino, wire in zip(paths, reply["attrs"], strict=True):
            attr = Attr.from_wire(wire)
            sink = io.BytesIO()
            await client.read_file(attr, sink)
            seen[ino] = (attr.version, sink.getvalue())
        self.history.group_reads.append(GroupRead(self.name, invoked, seen))

    async def _lister(self, client: Client) -> None:
        """The churners' files as another client sees them: each one that is there has the
        content its creator wrote (the creates are unwritten, as `dfs put` makes them)."""
        for name, _, attr in await client.readdir(ROOT):
            if not name.startswith(b"churn-"):
                continue
            try:
                seen = await client.getattr(attr.ino)
            except DfsError:
                continue  # unlinked meanwhile
            for what in (attr, seen):
                if what.version == 0:
                    self.history.seen_unwritten.append(
                        f"{self.name} saw {name.decode()} (ino={what.ino}) before its first "
                        f"content (unwritten={what.unwritten})")

    async def _churner(self, client: Client) -> None:
        """Create, write, rename over and unlink files nobody else reads but listers; a
        create is unwritten, so nobody sees a file before its content."""
        a = f"churn-{self.name}-{self.rng.randrange(CHURN_NAMES)}".encode()
        b = f"churn-{self.name}-{self.rng.randrange(CHURN_NAMES)}".encode()
        what = self.rng.choice(["create", "rename", "unlink"])
        try:
            if what == "create":
                attr = await client.create(ROOT, a, 0o100644, 0, 0, exclusive=False,
                                           unwritten=True)
                async with client.keeping_unwritten([attr.ino] if attr.unwritten else []):
                    await client.write_file(attr.ino, io.BytesIO(self.content()))
            elif what == "rename" and a != b:
                await client.rename(ROOT, a, ROOT, b)
            else:
                await client.unlink(ROOT, a)
            self.history.count(self.history.churn, f"{what} ok")
        except DfsError as e:
            self.history.count(self.history.churn, f"{what} {e.code.value}")


SNAPSHOTS_KEPT = 2


class SimOperator(SimProcess):
    """Runs the checker with --repair, takes and deletes snapshots, and drains then removes
    one node, under faults."""

    crashable = True

    def __init__(self, world: World, nodes: list[SimNode], history: History, until: float,
                 *, remove_one: bool) -> None:
        super().__init__(world, "operator")
        self.nodes = nodes
        self.history = history
        self.until = until
        self.remove_one = remove_one
        self.rng = random.Random(world.rng.random())
        self.leaving: SimNode | None = None  # drained, to be removed: chosen once
        self.snapshots = 0  # taken so far (named s1, s2, ...)

    async def run(self) -> None:
        async with _client() as client:
            while trio.current_time() < self.until:
                await trio.sleep(self.rng.uniform(2.0, 6.0))
                if self.remove_one and self.rng.random() < 0.3:
                    await self._drain_and_remove(client)
                    continue
                if self.rng.random() < 0.4:
                    await self._snapshot(client)
                    continue
                try:
                    report = await run_check(client, deep=True, repair=True)
                    self.history.count(self.history.admin,
                                       "repair ok" if report.ok else "repair partial")
                except DfsError as e:
                    self.history.count(self.history.admin, f"repair {e.code.value}")

    async def _snapshot(self, client: Client) -> None:
        """Take a snapshot of everything, keeping the last SNAPSHOTS_KEPT: the GC must keep
        every copy a snapshot names, across crashes in the middle of one (invariants.py)."""
        self.snapshots += 1
        name = f"s{self.snapshots}".encode()
        try:
            await client.snapshot_create("/", name, timeout=20.0)
            self.history.count(self.history.admin, "snapshot ok")
        except DfsError as e:
            self.history.count(self.history.admin, f"snapshot {e.code.value}")
        old = self.snapshots - SNAPSHOTS_KEPT
        if old >= 1:
            try:
                await client.snapshot_delete("/", f"s{old}".encode(), timeout=20.0)
                self.history.count(self.history.admin, "snapshot delete ok")
            except DfsError as e:
                self.history.count(self.history.admin, f"snapshot delete {e.code.value}")

    async def _drain_and_remove(self, client: Client) -> None:
        if self.leaving is None:
            live = [n for n in self.nodes if not n.removed and n.node_id]
            if len(live) <= 3:
                return
            self.leaving = self.rng.choice(live)
        node = self.leaving
        try:
            await client.node_drain(node.node_id)
            self.history.count(self.history.admin, "drain ok")
            await trio.sleep(self.rng.uniform(0.5, 3.0))
            await client.node_remove(node.node_id)
        except DfsError as e:
            self.history.count(self.history.admin, f"drain/remove {e.code.value}")
            return
        self.history.count(self.history.admin, "remove ok")
        self.remove_one = False
        node.removed = True
        self.world.log(f"REMOVED {node.name} (node {node.node_id}) for good")
        node.crash()


def ledger_key(node_id: int, blob: int) -> tuple[int, int]:
    return (node_id, blob)


def describe(history: History) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for op in history.writes:
        outcomes[op.outcome] = outcomes.get(op.outcome, 0) + 1
    groups: dict[str, int] = {}
    for members in history.groups.values():
        groups[members[0].outcome] = groups.get(members[0].outcome, 0) + 1
    return {"writes": outcomes, "reads": len(history.reads), "churn": history.churn,
            "admin": history.admin, "groups": groups, "group_reads": len(history.group_reads)}
