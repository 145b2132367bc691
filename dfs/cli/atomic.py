"""Several files in one atomic commit from the command line: `dfs put --atomic` and
`dfs txn run FILE` (docs/client.md, "Several files in one commit")."""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import trio

from dfs.cli.common import UsageError, cluster_path, print_json
from dfs.client import Client
from dfs.client.transaction import Transaction


def parse_if_versions(values: list[str] | None, dsts: list[str]) -> dict[str, int]:
    """`--if-version DST=N` (repeatable) -> {DST: N}; every DST must be one being written."""
    out: dict[str, int] = {}
    for value in values or ():
        dst, sep, n = value.rpartition("=")
        if not sep or not n.isdigit():
            raise UsageError(f"--if-version {value!r}: with --atomic it is DST=N")
        dst = cluster_path(dst)
        if dst not in dsts:
            raise UsageError(f"--if-version {value!r}: {dst} is not a DST of this put")
        out[dst] = int(n)
    return out


def _open(src: str) -> IO[bytes]:
    if src == "-":
        raise UsageError("put --atomic reads local files; '-' (standard input) is not one")
    return open(src, "rb")


async def put_atomic(client: Client, args: argparse.Namespace) -> int:
    """`dfs put --atomic SRC DST [SRC DST ...]`: every DST replaced in one commit, or none."""
    pairs = [args.src, args.path, *args.more]
    if len(pairs) % 2:
        raise UsageError("put --atomic takes SRC DST pairs")
    srcs, dsts = pairs[0::2], [cluster_path(p) for p in pairs[1::2]]
    if len(set(dsts)) != len(dsts):
        raise UsageError("put --atomic: a DST is named twice")
    versions = parse_if_versions(args.if_version, dsts)
    with ExitStack() as stack:
        t = client.transaction()
        for src, dst in zip(srcs, dsts, strict=True):
            source = await trio.to_thread.run_sync(_open, src)
            stack.enter_context(source)
            t.write(dst, source, if_version=versions.get(dst))
        attrs = await t.commit()
    if args.json:
        print_json({"committed": [{"path": p, **a.to_json()} for p, a in attrs.items()]})
    return 0


def load_ops(text: str) -> list[dict[str, Any]]:
    """A `dfs txn run` file: a JSON list of {"op": "write", "src", "path", "if_version"?},
    {"op": "remove", "path"}, {"op": "rename", "src", "dst"}, {"op": "mkdir", "path"}."""
    try:
        ops = json.loads(text)
    except ValueError as e:
        raise UsageError(f"not JSON: {e}") from None
    if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
        raise UsageError("a transaction file is a JSON list of operations (objects)")
    return ops


async def txn_run(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else await trio.to_thread.run_sync(
        lambda: open(args.file, encoding="utf-8").read())
    ops = load_ops(text)
    with ExitStack() as stack:
        t: Transaction = client.transaction()
        for i, op in enumerate(ops):
            kind = op.get("op")
            try:
                if kind == "write":
                    source = await trio.to_thread.run_sync(_open, str(op["src"]))
                    stack.enter_context(source)
                    version = op.get("if_version")
                    if version is not None and not isinstance(version, int):
                        raise UsageError(f"operation {i}: if_version must be an integer")
                    t.write(cluster_path(op["path"]), source, if_version=version)
                elif kind == "remove":
                    t.remove(cluster_path(op["path"]))
                elif kind == "rename":
                    t.rename(cluster_path(op["src"]), cluster_path(op["dst"]))
                elif kind == "mkdir":
                    t.mkdir(cluster_path(op["path"]), int(op.get("mode", 0o777 & ~_umask())))
                else:
                    raise UsageError(f"operation {i}: op is write, remove, rename or mkdir")
            except KeyError as e:
                raise UsageError(f"operation {i} ({kind}): missing {e}") from None
        attrs = await t.commit()
    if args.json:
        print_json({"committed": [{"path": p, **a.to_json()} for p, a in attrs.items()],
                    "operations": len(ops)})
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def get_consistent(client: Client, args: argparse.Namespace) -> int:
    """`dfs get --consistent PATH... DESTDIR`: every PATH as of one decision point."""
    names = [args.path, *([args.dest] if args.dest is not None else []), *args.more]
    if len(names) < 2:
        raise UsageError("get --consistent takes PATH... DESTDIR")
    paths, destdir = [cluster_path(p) for p in names[:-1]], Path(names[-1])
    if not destdir.is_dir():
        raise UsageError(f"{destdir} is not a local directory")
    bases = [posixpath.basename(p) for p in paths]
    if len(set(bases)) != len(bases):
        raise UsageError("get --consistent: two PATHs have the same file name")
    contents = await client.read_consistent(paths)
    for path, base in zip(paths, bases, strict=True):
        await trio.to_thread.run_sync((destdir / base).write_bytes, contents[path])
    return 0
