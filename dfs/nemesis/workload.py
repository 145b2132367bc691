"""The clients of a campaign: writers and readers through the library and through the mount.

Every worker loops until told to stop, recording each operation in the history before it
starts and when it ends. Writes store unique content (history.content_for), sometimes
conditionally (if_version, the lost-update guard); reads attribute what they got to exactly
one write, or record why they cannot. Mount operations run real programs (`cp`, `cat`, a small
Python writer) in child processes with a deadline, so a stuck FUSE request can never hang the
campaign: the child's session is killed, by its pid, and the operation is `info`. With a mount
load (mount_load.py), writers of every shape also rewrite their own files on the mount while
a second mount reads them; those are judged by the versions they leave.

A repairer runs `dfs check --deep --repair` every few seconds under the faults: an `admin`
op, ok when the check exited 0, fail when it could not run (exit 1), info when it left
findings unfixed (exit 3) or timed out. Under faults none of these is a violation; what it
found is counted for the summary, and the final phase judges what is left.
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dfs.chunks import file_checksum
from dfs.client import Attr, Client
from dfs.errors import Code, DfsError
from dfs.nemesis.cluster import NemesisCluster
from dfs.nemesis.history import FAIL, INFO, OK, History, Op, classify, content_for, digest
from dfs.nemesis.mount_load import MountLoad, failure_text, run_program

OP_TIMEOUT = 45.0
REPAIR_INTERVAL = (3.0, 10.0)  # seconds between two repair runs under the faults
EVENTS_KEPT = 16  # COMMIT txids and outcome answers a client remembers for the history
ABANDON = 0.04  # the share of library writes abandoned part-way
DIR = "nemesis"
# The mount writer: which step failed decides fail (open: nothing can commit) or info (a close
# that failed may have failed after the decision; a writer killed part-way commits nothing, and
# its content may show only whole: docs/nemesis.md).
MOUNT_WRITE = """
import os, sys
path, data = sys.argv[1], sys.stdin.buffer.read()
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
except OSError as e:
    print("open", e.errno); sys.exit(3)
try:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
except OSError as e:
    print("write", e.errno); os.close(fd); sys.exit(4)
try:
    os.close(fd)
except OSError as e:
    print("close", e.errno); sys.exit(5)
"""


class RecordingClient(Client):
    """A library client that counts COMMIT requests: a write that failed before sending any
    COMMIT certainly did not happen (the coordinator decides only on a client's COMMIT). It
    also notes each COMMIT's txid and each outcome answer, so a write's history record says
    which transactions it tried and what the coordinator said about them."""

    commits = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[str] = []

    def _event(self, what: str) -> None:
        self.events = [*self.events[-(EVENTS_KEPT - 1):], what]

    async def commit(self, txid: int, *args: Any, **kwargs: Any) -> Attr:
        self.commits += 1
        self._event(f"COMMIT {txid}")
        return await super().commit(txid, *args, **kwargs)

    async def outcome(self, txid: int) -> str:
        state = await super().outcome(txid)
        if state != "inflight":
            self._event(f"outcome {txid}: {state}")
        return state


def body_size(rng: random.Random, *, small: bool = False) -> int:
    """Mostly small files, some medium, a few of several 1 MiB chunks (mixes are per chunk)."""
    roll = rng.random()
    if roll < 0.55 or small:
        return rng.randrange(0, 4096)
    if roll < 0.87:
        return rng.randrange(4096, 256 * 1024)
    return rng.randrange(1024 * 1024, 2 * 1024 * 1024 + 300_000)


@dataclass
class Workload:
    cluster: NemesisCluster
    history: History
    seed: int
    files: list[str]  # written and read all along
    cold: list[str] = field(default_factory=list)  # written once before the faults, then read
    inos: dict[str, int] = field(default_factory=dict)
    stopping: bool = False
    unexpected: list[tuple[int, str]] = field(default_factory=list)  # (op id, traceback)
    counts: dict[str, int] = field(default_factory=dict)
    repair_found: Counter[str] = field(default_factory=Counter)  # finding kind -> count
    shapes: MountLoad | None = None  # the mount load, run with the mount workers

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    @property
    def all_files(self) -> list[str]:
        return [*self.files, *self.cold]

    def stop(self) -> None:
        """Every worker ends after its operation in flight."""
        self.stopping = True
        if self.shapes is not None:
            self.shapes.stopping = True

    async def setup(self) -> None:
        """Create the directory and the files, and write the cold ones, before any fault
        (namespace operations are not what this campaign tests). Cold files keep their blob
        to the end, so bit flips in them outlive the run and the repair has work to do."""
        rng = self.rng("setup")
        async with self.cluster.client(via="") as client:
            root = await client.resolve("/")
            d = await client.mkdir(root.ino, DIR.encode(), 0o755, 0, 0)
            for file in self.all_files:
                attr = await client.create(d.ino, file.encode(), 0o644, 0, 0)
                self.inos[file] = attr.ino
            for file in self.cold:
                size = rng.randrange(1024 * 1024, 3 * 1024 * 1024)
                content = content_for(self.seed, self.history.peek_id(), file, size)
                op = self.history.invoke("setup", "write", file, "lib", size=len(content),
                                         digest=digest(content))
                attr = await client.write_file(self.inos[file],
                                               io.BytesIO(content))
                self.history.complete(op, OK, version=attr.version, version_known=True)
            if self.shapes is not None:
                await self.shapes.setup(client)

    async def listed_blobs(self, client: Client) -> dict[int, set[int]]:
        """Every blob a file holds (its current one; the mount load's kept ones too) and the
        nodes it lists for it."""
        listed: dict[int, set[int]] = {}
        for file in self.all_files:
            attr = await client.getattr(self.inos[file])
            if attr.blob is not None:
                listed[attr.blob] = set(attr.replicas)
        if self.shapes is not None:
            listed.update(await self.shapes.blobs(client))
        return listed

    async def current_blobs(self) -> dict[str, frozenset[int]]:
        """Each node's listed copies of the files' current blobs (the load has stopped): a
        copy a node still holds but no file lists there (GC will delete it) is not one."""
        async with self.cluster.client(via="") as client:
            attrs = [await client.getattr(self.inos[f]) for f in self.all_files]
            names = self.cluster.names_by_id(await client.node_list())
        listed: dict[str, set[int]] = {}
        for a in attrs:
            if a.blob is not None:
                for node_id in a.replicas:
                    if node_id in names:
                        listed.setdefault(names[node_id], set()).add(a.blob)
        return {name: frozenset(blobs) for name, blobs in listed.items()}

    async def run(self, lib_writers: int, lib_readers: int, mount: bool,
                  repairs: bool = False) -> None:
        async with trio.open_nursery() as nursery:
            if repairs:
                nursery.start_soon(self._repairs)
            for i in range(lib_writers):
                nursery.start_soon(self._loop, f"lib-writer-{i}", self.lib_write)
            for i in range(lib_readers):
                nursery.start_soon(self._loop, f"lib-reader-{i}", self.lib_read)
            if mount:
                nursery.start_soon(self._loop, "mount-writer", self.mount_write)
                nursery.start_soon(self._loop, "mount-reader", self.mount_read)
                if self.shapes is not None:
                    nursery.start_soon(self.shapes.run)

    async def _loop(self, name: str,
                    step: Callable[[str, random.Random, Any], Awaitable[str]]) -> None:
        rng = self.rng(name)
        async with self.cluster.client(factory=RecordingClient) as client:
            while not self.stopping:
                outcome = await step(name, rng, client)
                self.counts[outcome] = self.counts.get(outcome, 0) + 1
                # Back off a little after a failure, so a dead cluster isn't hammered.
                await trio.sleep(rng.uniform(0, 0.05) if outcome == OK else rng.uniform(0.1, 0.4))

    # ------------------------------------------------------------ repairs under faults

    async def _repairs(self) -> None:
        rng = self.rng("repairer")
        while not self.stopping:
            await trio.sleep(rng.uniform(*REPAIR_INTERVAL))
            if not self.stopping:
                await self.repair()

    async def repair(self) -> str:
        """One `dfs check --deep --repair --json`; its outcome and what it found recorded."""
        op = self.history.invoke("repairer", "repair", "*", "admin")
        try:
            result = await self.cluster.dfs("check", "--deep", "--repair", "--json",
                                            timeout=OP_TIMEOUT)
        except trio.TooSlowError:
            self.history.complete(op, INFO, error="timeout")
            return INFO
        try:
            doc = json.loads(result.stdout or b"null")
        except ValueError:
            doc = None
        found = list(doc.get("findings") or []) if isinstance(doc, dict) else []
        for f in found:
            self.repair_found[f"{f.get('kind')} {'fixed' if f.get('fixed') else 'unfixed'}"] += 1
        outcome = {0: OK, 1: FAIL}.get(result.returncode, INFO)
        fixed = sum(1 for f in found if f.get("fixed"))
        self.history.complete(
            op, outcome, detail=f"exit {result.returncode}: {len(found)} finding(s), "
            f"{fixed} fixed: " + ", ".join(sorted({str(f.get('kind')) for f in found})),
            error=None if outcome == OK else result.stderr.decode(errors="replace")[-300:])
        return outcome

    # ------------------------------------------------------------ the client library

    async def lib_write(self, name: str, rng: random.Random, client: RecordingClient) -> str:
        file = rng.choice(self.files)
        ino = self.inos[file]
        if_version = rng.random() < 0.3
        base = None
        if if_version:
            try:
                with trio.fail_after(10):
                    base = (await client.getattr(ino)).version
            except (DfsError, trio.TooSlowError):
                return FAIL  # not an operation yet: nothing was attempted
        content = content_for(self.seed, self.history.peek_id(), file, body_size(rng))
        op = self.history.invoke(name, "write", file, "lib", size=len(content),
                                 digest=digest(content), if_version=if_version, base=base)
        commits = client.commits
        client.events = []
        # Now and then the writer gives up part-way, as a client that crashed or lost
        # interest would: the coordinator and the nodes must clean up after it.
        abandon = rng.uniform(0.0, 0.5) if rng.random() < ABANDON else math.inf
        try:
            with trio.fail_after(OP_TIMEOUT):
                with trio.move_on_after(abandon) as gave_up:
                    attr = await client.write_file(ino, io.BytesIO(content),
                                                   base_version=base, if_version=if_version)
                if gave_up.cancelled_caught:
                    raise trio.TooSlowError("abandoned by the writer")
        except Exception as e:  # noqa: BLE001 - anything but a DfsError is also a finding
            outcome = classify(e, committed=client.commits > commits)
            self.history.complete(op, outcome, error=self._describe(op, e),
                                  detail="; ".join(client.events) or None)
            return outcome
        self.history.complete(op, OK, version=attr.version,
                              version_known=attr.checksum == file_checksum(content),
                              detail="; ".join(client.events) or None)
        return OK

    async def lib_read(self, name: str, rng: random.Random, client: Client) -> str:
        file = rng.choice(self.all_files)
        op = self.history.invoke(name, "read", file, "lib")
        try:
            with trio.fail_after(OP_TIMEOUT):
                for attempt in range(3):
                    attr = await client.getattr(self.inos[file])
                    sink = io.BytesIO()
                    try:
                        await client.read_file(attr, sink)
                        break
                    except DfsError as e:
                        if e.code is not Code.ESTALE or attempt == 2:
                            raise  # superseded and collected under us: read the new one
        except Exception as e:  # noqa: BLE001 - anything but a DfsError is also a finding
            self.history.complete(op, FAIL, error=self._describe(op, e))
            return FAIL
        self.history.attribute(op, sink.getvalue())
        self.history.complete(op, OK, version=attr.version)
        return OK

    def _describe(self, op: Op, error: Exception) -> str:
        """One line for the history. The client library should raise only DfsError (and a
        timeout is ours): anything else is kept, with its traceback, as a finding."""
        if isinstance(error, DfsError):
            return f"{error.code.value}: {error.msg}"[:300]
        if isinstance(error, trio.TooSlowError):
            return str(error) or "timeout"
        if not isinstance(error, EXPECTED):
            trace = "".join(traceback.format_exception(error))
            self.unexpected.append((op.id, trace))
            self.history.note("unexpected error", op=op.id, traceback=trace)
        return f"{type(error).__name__}: {error}"[:300]

    # ------------------------------------------------------------ the FUSE mount

    def mount_file(self, file: str) -> Path:
        return self.cluster.mount_path / DIR / file

    async def mount_write(self, name: str, rng: random.Random, client: Client) -> str:
        file = rng.choice(self.files)
        content = content_for(self.seed, self.history.peek_id(), file,
                              body_size(rng, small=rng.random() < 0.5))
        use_cp = rng.random() < 0.5
        op = self.history.invoke(name, "write", file, "mount", size=len(content),
                                 digest=digest(content))
        target = self.mount_file(file)
        if use_cp:
            source = self.cluster.root / f"{name}.src"
            await trio.to_thread.run_sync(source.write_bytes, content)
            argv, stdin = ["cp", str(source), str(target)], b""
        else:
            argv, stdin = [sys.executable, "-c", MOUNT_WRITE, str(target)], content
        status, out, err = await run_program(argv, stdin, timeout=OP_TIMEOUT)
        if status == 0:
            self.history.complete(op, OK)
            return OK
        # Nothing can commit if open failed. After that the close may have failed after the
        # decision, or the deadline killed the writer in its close: it may show, but whole
        # (mount_ends.py settles, at the end, which of these certainly did not commit).
        outcome = FAIL if out.startswith(b"open") else INFO
        self.history.complete(op, outcome, cut=status is None,
                              error=f"{argv[0]}: {failure_text(status, out + err)}")
        return outcome

    async def mount_read(self, name: str, rng: random.Random, client: Client) -> str:
        file = rng.choice(self.all_files)
        op = self.history.invoke(name, "read", file, "mount")
        status, out, err = await run_program(["cat", str(self.mount_file(file))],
                                             timeout=OP_TIMEOUT)
        if status != 0:
            self.history.complete(op, FAIL, error=f"cat: {failure_text(status, err)}")
            return FAIL
        self.history.attribute(op, out)
        self.history.complete(op, OK)
        return OK


EXPECTED = (DfsError, OSError, trio.TooSlowError)
