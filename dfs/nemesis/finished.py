"""Judge what writers through a mount left behind: every version another client can see is one
a writer finished (issue 17, docs/mount.md).

A writer finishes a content when the close (or fsync) it meant as its end returns, or when it
exits normally and leaves the close to exit(). Nothing before that may become a version: not
what a FLUSH from a descriptor a forked child inherited cut, not the empty file a shell
redirect opens before it writes, not the half a killed writer left, not what a stopped mount
held. The writers (mount_writers.py) record per file, in a `Target`, what the file may show
before them and the contents they finished, in order; then

- `judge_versions` checks the file's whole history (every committed version, listed with the
  version history kept: `dfs coordinator --keep-versions`), and for a file its writers rewrite
  in place, that its new versions are exactly the finished contents in order (none lost, none
  twice);
- `judge_reads` checks every whole-file read another mount made meanwhile.

Under faults (the nemesis campaign, mount_load.py) a writer's end may fail: its close returns
EIO, or the writer is cut short while it may be closing. Such a content is `unknown`: its
commit may have been decided before the error (a lost reply), so it may show, whole, at most
once, never before a write finished ahead of it; or never. And the mount retries a commit
whose first attempt's outcome it could not learn, which may commit the same bytes twice:
with `repeats_ok`, a version that repeats the one before it is one version (the caller counts
them with `repeated` and holds them against the retries the mount logged).

Contents are compared by (size, xxh3_128), so a 3 MB version costs no more to keep than a line.
Unlike checker.py, which judges operations against their outcomes and times, this needs no
clock: only what was finished. A version nobody finished is read back (`content_of`) and named
by its header (history.content_for) where it has one, e.g. "the first 1,045,376 of the
3,000,000 bytes of fork-loop#1000018": the shape of the bug that cut it.
"""

from __future__ import annotations

import errno
import io
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise, zip_longest

from dfs.client import Attr, Client
from dfs.nemesis.checker import Violation
from dfs.nemesis.history import HEADER, digest

Key = tuple[int, str]  # (size, xxh3_128 hex) of one content
EMPTY: Key = (0, digest(b""))
#: Read errors a file replaced by a new inode may give (tar unlinks first, rsync renames over):
#: the name is missing for a moment, or the old inode's blob was collected under a reader.
REPLACED_ERRORS = frozenset({errno.ENOENT, errno.ESTALE})


def key(data: bytes) -> Key:
    return (len(data), digest(data))


def attr_key(attr: Attr) -> Key:
    """An empty version has no blob and may carry no checksum."""
    if attr.size == 0:
        return EMPTY
    return (attr.size, attr.checksum.hex() if attr.checksum is not None else "?")


def describe(k: Key) -> str:
    return "empty" if k[0] == 0 else f"{k[0]:,} bytes ({k[1][:12]})"


@dataclass
class Target:
    """One file the writers write: what it may show before them, what they finished.

    `in_place`: its writers rewrite this very inode one after another, so its versions after
    the old ones are exactly `finished`, in order. Otherwise (tar, rsync: a new inode under the
    name) its versions need only be finished ones, and a reader may miss the name for a moment.
    """

    file: str
    in_place: bool = True
    old: dict[Key, str] = field(default_factory=dict)
    finished: list[tuple[Key, str]] = field(default_factory=list)
    # content -> (label, how many writes had finished before its writer began)
    maybe: dict[Key, tuple[str, int]] = field(default_factory=dict)
    ops: dict[int, tuple[Key, str]] = field(default_factory=dict)  # header op id -> content
    _labels: dict[Key, str] = field(default_factory=dict, repr=False)  # finished, first label

    def before(self, data: bytes, label: str) -> None:
        """A content the file may show before any of its writers finished."""
        self.old[key(data)] = label

    def finish(self, data: bytes, label: str) -> None:
        """The next content a writer of this file finished."""
        k = key(data)
        self.finished.append((k, label))
        self._labels.setdefault(k, label)
        self._header(data, k, label)

    def unknown(self, data: bytes, label: str, after: int | None = None) -> None:
        """A content whose writer did not finish it but whose commit may have been decided
        (its close failed, or it was cut short while it may have been closing). `after`: how
        many of `finished` were finished before its writer began (default: all so far)."""
        k = key(data)
        self.maybe.setdefault(k, (label, len(self.finished) if after is None else after))
        self._header(data, k, label)

    def _header(self, data: bytes, k: Key, label: str) -> None:
        match = HEADER.match(data[:200])
        if match is not None:
            self.ops[int(match.group(1))] = (k, label)

    def label(self, k: Key) -> str | None:
        """Who finished (or left before the writers, or may have committed) a content, None
        if nobody did."""
        maybe = self.maybe.get(k)
        return self.old.get(k) or self._labels.get(k) or (maybe[0] if maybe else None)

    def explain(self, data: bytes) -> str:
        """What an unfinished content is: whose prefix, by its header, if it has one."""
        if not data:
            return "empty"
        match = HEADER.match(data[:200])
        known = self.ops.get(int(match.group(1))) if match is not None else None
        if known is None:
            return f"{len(data):,} bytes, no writer's header: {data[:40]!r}"
        (size, _), label = known
        if len(data) < size:
            return f"the first {len(data):,} of the {size:,} bytes of {label}"
        return f"{len(data):,} bytes starting as {label} ({size:,} bytes)"


@dataclass(frozen=True)
class Version:
    number: int
    key: Key


@dataclass(frozen=True)
class Read:
    """One whole-file read (open, read all, close): what it got, or its errno."""

    file: str
    key: Key | None
    error: int | None = None


def judge_versions(target: Target, versions: list[Version],
                   what: dict[int, str] | None = None, *, repeats_ok: bool = False
                   ) -> list[Violation]:
    """Every version is old, finished or unknown; for an in-place file, the new ones are
    exactly the finished contents in order, each unknown one at most once and never before a
    write finished ahead of it; the history has no gap (else versions went unseen).
    `what` names unfinished versions by number (judge_file reads them back for it);
    `repeats_ok`: a version repeating the one before it counts as that one (see above)."""
    out: list[Violation] = []
    versions = sorted(versions, key=lambda v: v.number)
    numbers = [v.number for v in versions]
    if numbers and numbers != list(range(numbers[0], numbers[-1] + 1)):
        out.append(Violation("history-gap", target.file, f"versions {numbers}: some were not "
                             "kept, so they could not be judged (raise --keep-versions)"))
    bad = [v for v in versions if target.label(v.key) is None]
    for v in bad:
        out.append(Violation("unfinished-version", target.file,
                             f"version {v.number}: {(what or {}).get(v.number) or describe(v.key)}"
                             ", which no writer finished"))
    if bad or not target.in_place:
        return out
    rest = versions
    while rest and rest[0].key in target.old:
        rest = rest[1:]
    if repeats_ok:
        rest = [v for i, v in enumerate(rest) if i == 0 or v.key != rest[i - 1].key]
    done: list[Version] = []  # the finished ones, in order
    shown: set[Key] = set()
    for v in rest:
        if v.key not in target.maybe:
            done.append(v)
            continue
        label, after = target.maybe[v.key]
        if v.key in shown or len(done) < after:
            out.append(Violation("not-one-version-each", target.file, f"version {v.number}: "
                                 f"{label}, whose end failed, " + (
                                     "shows again" if v.key in shown else
                                     f"comes before {after - len(done)} write(s) finished "
                                     "before it began")))
        shown.add(v.key)
    got = [target.label(v.key) for v in done]
    want = [label for _, label in target.finished]
    if got != want:
        i = next(i for i, (g, w) in enumerate(zip_longest(got, want)) if g != w)
        where = f"version {done[i].number}" if i < len(done) else "the end"
        missing = [w for w in want if w not in got]
        twice = sorted({str(g) for g in got if got.count(g) > 1})
        out.append(Violation("not-one-version-each", target.file,
                             f"{len(done)} new versions for {len(want)} finished writes; at "
                             f"{where}: {got[i:i + 3]} where the writers finished "
                             f"{want[i:i + 3]} (missing {missing[:5]}, more than once "
                             f"{twice[:5]})"))
    return out


def repeated(versions: list[Version]) -> int:
    """How many versions repeat the content of the one before them."""
    ordered = sorted(versions, key=lambda v: v.number)
    return sum(1 for a, b in pairwise(ordered) if a.key == b.key)


def judge_reads(targets: dict[str, Target], reads: list[Read]) -> list[Violation]:
    """Every read got an old content or a finished one (or, for a file replaced by a new
    inode, missed it for a moment)."""
    out: list[Violation] = []
    for read in reads:
        target = targets[read.file]
        if read.error is not None:
            if target.in_place or read.error not in REPLACED_ERRORS:
                out.append(Violation("read-error", read.file, f"a read failed: "
                                     f"{errno.errorcode.get(read.error, read.error)}"))
        elif read.key is not None and target.label(read.key) is None:
            out.append(Violation("unfinished-read", read.file,
                                 f"a read got {describe(read.key)}, which no writer finished"))
    return out


async def history(client: Client, path: str) -> tuple[Attr, list[Version]]:
    """The file's attributes and every version it keeps, the current one included."""
    attr = await client.resolve(path)
    return attr, [Version(a.version, attr_key(a)) for a in await client.history(attr.ino)]


async def content_of(client: Client, attr: Attr, number: int) -> bytes:
    """One version's bytes, to name what an unfinished version is (Target.explain)."""
    version = await client.version(attr.ino, number)
    sink = io.BytesIO()
    if version.size:
        await client.read_file(version, sink)
    return sink.getvalue()


async def judge_file(client: Client, path: str, target: Target, *, repeats_ok: bool = False
                     ) -> tuple[list[Version], list[Violation]]:
    """List the file's versions, read back the ones nobody finished to name them, judge."""
    attr, versions = await history(client, path)
    what = {v.number: target.explain(await content_of(client, attr, v.number))
            for v in versions if target.label(v.key) is None}
    return versions, judge_versions(target, versions, what, repeats_ok=repeats_ok)


def summary(targets: dict[str, Target], versions: int, reads: list[Read],
            violations: list[Violation]) -> str:
    """One line: writes finished (and unknown, if any), versions and reads judged (failed
    reads by errno), and how many were unexplained, of which kinds."""
    finished = sum(len(t.finished) for t in targets.values())
    unknown = sum(len(t.maybe) for t in targets.values())
    failed = Counter(errno.errorcode.get(r.error, str(r.error)) for r in reads
                     if r.error is not None)
    kinds = sorted({v.kind for v in violations})
    return (f"{len(targets)} files, {finished} finished writes, "
            + (f"{unknown} whose end failed, " if unknown else "")
            + f"{versions} versions, {len(reads)} reads"
            + (f" ({', '.join(f'{n} {e}' for e, n in sorted(failed.items()))})" if failed
               else "")
            + (f": {len(violations)} unexplained ({', '.join(kinds)})" if violations
               else ": none unexplained"))
