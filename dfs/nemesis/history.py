"""The campaign's history: every operation as invoked, then ok / fail / info, and every fault.

As in Jepsen, an operation completes in one of three ways: `ok` (it happened), `fail` (it
certainly did not happen: the system said so before any commit could have been decided) and
`info` (unknown: a timeout or a lost connection during the commit; it may take effect at any
moment after its invocation, or never). The checker reasons over exactly these three.

Each write carries recognisable content, so any bytes read back name the one write they came
from: a header line with the writing op's id and file, then a body generated from a seed by
the op id. The history keeps each write's size and xxh3_128 instead of its bytes; a read is
attributed by its header and verified by its digest, so bytes from two versions (a mix) can
never pass as one write's content.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from dfs.chunks import file_checksum
from dfs.errors import Code, DfsError

OK, FAIL, INFO = "ok", "fail", "info"
# A write that failed with one of these was refused before any decision: it did not happen.
DEFINITE = frozenset({Code.CONFLICT, Code.ENOSPC, Code.ENOENT, Code.EISDIR, Code.ENOTDIR,
                      Code.EINVAL, Code.BAD_REQUEST, Code.EPERM, Code.AUTH, Code.CHECKSUM})
HEADER = re.compile(rb"^dfs-nemesis op=(\d+) file=(\S+)\n")
INITIAL = 0  # the op id "written" by file creation: empty content
FOREIGN_IDS = 10**9  # op ids programs give their own writes start here (History.invoke)


@dataclass
class Op:
    """One operation of one worker; times are seconds since the campaign's start."""

    id: int
    process: str
    f: str  # "write" or "read"
    file: str
    via: str  # "lib" (client library) or "mount" (through the FUSE mount)
    invoke: float
    complete: float | None = None
    outcome: str | None = None
    size: int | None = None  # writes: content length
    digest: str | None = None  # writes: xxh3_128 of the content, hex
    if_version: bool = False
    base: int | None = None  # writes with if_version: the version the write was based on
    version: int | None = None  # version written (ok writes) or read (library reads)
    version_known: bool = False  # the returned attributes describe this write's own version
    saw: int | None = None  # reads: the op id whose content was read (INITIAL for empty)
    problem: str | None = None  # reads: why the content is not exactly one write's
    cut: bool = False  # mount writes: cut short (deadline, campaign's end), perhaps in a close
    error: str | None = None
    detail: str | None = None  # admin ops: the target, or what a repair found and fixed

    def done_by(self, t: float) -> bool:
        return self.complete is not None and self.complete < t


def classify(error: BaseException, committed: bool = True) -> str:
    """fail only when the write certainly did not happen; anything unclear is info."""
    if not committed:
        return FAIL  # no COMMIT was ever sent for it
    if isinstance(error, DfsError):
        if error.code in DEFINITE:
            return FAIL
        # Every attempt ended in a known abort (the client library says so in this message);
        # "outcome ... still unknown" and lost connections are info.
        if error.code is Code.UNAVAILABLE and "failed after" in error.msg:
            return FAIL
    return INFO


def content_for(seed: int, op_id: int, file: str, body_size: int) -> bytes:
    """The unique bytes write `op_id` stores: header, then a body from a seeded generator."""
    header = f"dfs-nemesis op={op_id} file={file}\n".encode()
    return header + random.Random(seed * 1_000_003 + op_id).randbytes(body_size)


def digest(data: bytes) -> str:
    return file_checksum(data).hex()


class History:
    """In-memory ops for the checker, and a JSON-lines file written as things happen."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = Path(path)
        self.seed = seed
        self.start = time.monotonic()
        self.wall_start = time.time()  # to place the processes' log lines on this clock
        self.ops: dict[int, Op] = {}
        self.faults: list[dict[str, Any]] = []
        self._next = 1
        self._file: IO[str] = open(self.path, "w")  # noqa: SIM115 - closed by close()

    def now(self) -> float:
        return round(time.monotonic() - self.start, 4)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    # ------------------------------------------------------------ operations

    def invoke(self, process: str, f: str, file: str, via: str, *, op_id: int | None = None,
               at: float | None = None, **fields: Any) -> Op:
        """A new op, numbered in turn, or `op_id` when a program numbered it itself (the
        fork loop's writes, from their own range: `FOREIGN_IDS` and up, recorded once the
        program ended, invoked `at` when it started)."""
        if op_id is None:
            op_id = self._next
            self._next += 1
        assert op_id not in self.ops, f"op {op_id} twice"
        op = Op(op_id, process, f, file, via, self.now() if at is None else at, **fields)
        self.ops[op.id] = op
        self._write({"type": "invoke", **_fields(op)})
        return op

    def complete(self, op: Op, outcome: str, **fields: Any) -> None:
        op.complete = self.now()
        op.outcome = outcome
        for key, value in fields.items():
            setattr(op, key, value)
        self._write({"type": outcome, **_fields(op)})

    def peek_id(self) -> int:
        """The id the next invoke() gets (writes build their content from it first)."""
        return self._next

    def attribute(self, op: Op, data: bytes) -> None:
        """Set op.saw to the write `data` came from, or op.problem to why it can't be one."""
        op.saw, op.problem = self.identify(op.file, data)

    def identify(self, file: str, data: bytes) -> tuple[int | None, str | None]:
        """(the write `data` is the content of, None if no write's) and what is wrong if any.

        Only a write's whole content is one: a mount writer killed part-way commits nothing
        (docs/design.md §7, "Which close commits"), so a prefix of its content is a mix too.
        """
        if not data:
            return INITIAL, None
        match = HEADER.match(data[:200])
        if match is None:
            return None, f"{len(data)} bytes without a nemesis header: {data[:40]!r}"
        writer = self.ops.get(int(match.group(1)))
        if writer is None or writer.f != "write":
            return None, f"header names op {match.group(1).decode()}, which is no write"
        if match.group(2).decode() != file:
            return writer.id, f"content of op {writer.id} for {match.group(2).decode()}"
        if len(data) != writer.size or digest(data) != writer.digest:
            return writer.id, (f"starts as op {writer.id} ({writer.size} bytes) but is "
                               f"{len(data)} bytes with another digest: a mix")
        return writer.id, None

    # ------------------------------------------------------------ faults

    def fault(self, kind: str, phase: str, target: str, **details: Any) -> None:
        """A fault's start or stop; the start record kept in `faults` gets its `stop` time."""
        record = {"type": "nemesis", "kind": kind, "phase": phase, "target": target,
                  "time": self.now(), **details}
        if phase == "start":
            self.faults.append(record)
        else:
            for started in reversed(self.faults):
                if started["kind"] == kind and started["target"] == target \
                        and "stop" not in started:
                    started["stop"] = record["time"]
                    break
        self._write(record)

    def note(self, what: str, **details: Any) -> None:
        self._write({"type": "note", "what": what, "time": self.now(), **details})


def _fields(op: Op) -> dict[str, Any]:
    return {k: v for k, v in asdict(op).items() if v is not None and v is not False}
