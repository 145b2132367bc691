"""File commands: ls, stat, cat, get, put, rm, mkdir, rmdir, mv (docs/design.md §11)."""

from __future__ import annotations

import argparse
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import trio

from dfs.cli.common import (
    UsageError,
    add_json,
    cluster_path,
    command,
    join,
    print_json,
    progress_bar,
    show,
    size_text,
    split,
    with_client,
)
from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client import Attr, Client


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def _create_file(client: Client, path: str) -> tuple[int, bytes, Attr]:
    """The file at path, created unwritten (hidden from others until its first commit) if
    missing; its parent must exist. Returns the parent's inode and the name with it."""
    parent, name = split(path)
    directory = await client.resolve(parent)
    mode = stat.S_IFREG | (0o666 & ~_umask())
    attr = await client.create(
        directory.ino, name, mode, os.getuid(), os.getgid(), exclusive=False, unwritten=True
    )
    return directory.ino, name, attr


async def _lookup(client: Client, path: str) -> Attr | None:
    try:
        return await client.resolve(path)
    except DfsError as e:
        if e.code is Code.ENOENT:
            return None
        raise


# ---------------------------------------------------------------- ls / stat


def _mtime(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))


async def ls(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    attr = await client.resolve(path)
    if attr.is_dir():
        entries = await client.listdir(attr.ino)
    else:
        entries = [(os.fsencode(posixpath.basename(path)), attr)]
    if args.json:
        print_json(
            {"path": path, "entries": [{"name": os.fsdecode(n), **a.to_json()} for n, a in entries]}
        )
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False)
    for column in ("mode", "nlink", "uid", "gid", "size", "version", "mtime", "name"):
        table.add_column(column, justify="right" if column in ("nlink", "size") else "left")
    for name, a in entries:
        shown = os.fsdecode(name) + ("/" if a.is_dir() else "")
        if a.is_symlink() and a.target is not None:
            shown += " -> " + os.fsdecode(a.target)
        table.add_row(
            stat.filemode(a.mode), str(a.nlink), str(a.uid), str(a.gid), _size_column(a),
            f"v{a.version}", _mtime(a.mtime_ns), Text(shown),
        )
    show(table)
    return 0


def _size_column(attr: Attr) -> str:
    """The size, or for a device its number as `ls -l` shows it ("major, minor")."""
    if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode):
        return f"{os.major(attr.rdev)}, {os.minor(attr.rdev)}"
    return str(attr.size)


async def stat_(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    attr = await client.resolve(path)
    doc = {"path": path, **attr.to_json()}
    if args.json:
        print_json(doc)
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    doc["mode"] = f"{stat.filemode(attr.mode)} ({attr.mode:o})"
    doc["size"] = f"{attr.size} ({size_text(attr.size)})"
    for ts in ("atime_ns", "mtime_ns", "ctime_ns"):
        doc[ts] = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(doc[ts] / 1e9))}"
    doc["replicas"] = ", ".join(map(str, attr.replicas)) or "-"
    for key, value in doc.items():
        table.add_row(key, Text("-" if value is None else str(value)))
    show(table)
    return 0


# ---------------------------------------------------------------- cat / get


async def _readable(client: Client, path: str, version: int | None = None) -> Attr:
    """The file at path, at `version` if given (a kept one: docs/coordinator.md)."""
    attr = await client.resolve(cluster_path(path))
    if attr.is_dir():
        raise DfsError(Code.EISDIR, f"{path} is a directory")
    if attr.is_special():
        raise DfsError(Code.EINVAL, f"{path} is a {attr.kind}: its data never passes "
                                    "through dfs, only a mount's kernel serves it")
    if version is not None and version != attr.version:
        return await client.version(attr.ino, version)
    return attr


async def cat(client: Client, args: argparse.Namespace) -> int:
    return await _stream(client, args.path, sys.stdout.buffer, args.version)


async def _stream(client: Client, path: str, out: IO[bytes], version: int | None = None
                  ) -> int:
    """Stream into `out`, which can't be rewound (stdout, a FIFO, a device): a version
    collected before its first byte went out is re-read, after that the read fails."""
    for _ in range(3):
        attr = await _readable(client, path, version)
        written = 0

        def count(done: int) -> None:
            nonlocal written
            written = done

        try:
            await client.read_file(attr, out, count)
            await trio.to_thread.run_sync(out.flush)
            return 0
        except DfsError as e:
            if e.code is not Code.ESTALE or written:
                raise
    raise DfsError(Code.ESTALE, f"{path} keeps changing while being read")


async def _read_with_retry(client: Client, path: str, sink: IO[bytes], label: str,
                           version: int | None = None) -> Attr:
    """Read the current version; if it is superseded and collected mid-read, start over."""
    for _ in range(3):
        attr = await _readable(client, path, version)
        await trio.to_thread.run_sync(sink.seek, 0)
        await trio.to_thread.run_sync(sink.truncate)
        try:
            with progress_bar(label, attr.size) as progress:
                await client.read_file(attr, sink, progress)
            return attr
        except DfsError as e:
            if e.code is not Code.ESTALE:
                raise
    raise DfsError(Code.ESTALE, f"{path} keeps changing while being read")


async def get(client: Client, args: argparse.Namespace) -> int:
    if args.consistent:
        from dfs.cli.atomic import get_consistent

        if args.version is not None:
            raise UsageError("--version reads one file; --consistent reads current versions")

        return await get_consistent(client, args)
    if args.more:
        raise UsageError("more than PATH DEST needs --consistent (PATH... DESTDIR)")
    if args.dest == "-":
        return await cat(client, args)
    version = args.version
    name = posixpath.basename(cluster_path(args.path)) or "root"
    dest = Path(args.dest if args.dest is not None else name)
    if dest.is_dir():
        dest = dest / name
    if dest.exists() and not dest.is_file():
        # A device, FIFO or socket (`dfs get f /dev/null`): written into, never renamed over,
        # which would put a regular file where the device was.
        with open(dest, "wb", buffering=0) as out:
            return await _stream(client, args.path, out, version)
    # Into a temporary file beside DEST, renamed over it at the end: no half-written DEST.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".dfs-get")
    try:
        with os.fdopen(fd, "w+b") as sink:
            attr = await _read_with_retry(client, args.path, sink, str(dest), version)
            await trio.to_thread.run_sync(os.fsync, sink.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.utime(tmp, ns=(attr.atime_ns, attr.mtime_ns))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 0


# ---------------------------------------------------------------- put


def _spool_stdin() -> IO[bytes]:
    """Standard input copied to an unnamed temporary file, so a retry can read it again."""
    spool = tempfile.TemporaryFile(prefix="dfs-put-")
    shutil.copyfileobj(sys.stdin.buffer, spool, 1024 * 1024)
    return spool


async def put(client: Client, args: argparse.Namespace) -> int:
    if args.atomic:
        from dfs.cli.atomic import put_atomic

        return await put_atomic(client, args)
    if args.more:
        raise UsageError("more than one SRC DST pair needs --atomic")
    if args.if_version is not None:
        if len(args.if_version) != 1 or not args.if_version[0].isdigit():
            raise UsageError("--if-version N takes one version number (DST=N with --atomic)")
        args.if_version = int(args.if_version[0])
    path = cluster_path(args.path)
    if args.src == "-":
        source = await trio.to_thread.run_sync(_spool_stdin)
    else:
        source = await trio.to_thread.run_sync(open, args.src, "rb")
    with source:
        size = await trio.to_thread.run_sync(lambda: os.fstat(source.fileno()).st_size)
        attr = await _lookup(client, path)
        if attr is not None and attr.is_dir():
            if args.src == "-":
                raise DfsError(Code.EISDIR, f"{path} is a directory")
            path = join(path, os.path.basename(args.src))
            attr = await _lookup(client, path)
        created = None
        if attr is None:
            if args.if_version not in (None, 0):
                raise DfsError(Code.CONFLICT, f"{path} does not exist (version 0)")
            parent, name, attr = await _create_file(client, path)
            created = (parent, name) if attr.unwritten else None
        if not attr.is_file():
            raise DfsError(Code.EISDIR if attr.is_dir() else Code.EINVAL, f"{path} is no file")
        conditional = args.if_version is not None
        try:
            with progress_bar(path, size) as progress:
                async with client.keeping_unwritten([attr.ino] if created else []):
                    attr = await client.write_file(
                        attr.ino,
                        source,
                        base_version=args.if_version if conditional else attr.version,
                        if_version=conditional,
                        progress=progress,
                    )
        except BaseException:
            if created is not None:
                await client.remove_unwritten(*created, attr.ino, client.timeout)
            raise
    if args.json:
        print_json({"path": path, **attr.to_json()})
    return 0


# ---------------------------------------------------------------- namespace


async def rm(client: Client, args: argparse.Namespace) -> int:
    parent, name = split(args.path)
    await client.unlink((await client.resolve(parent)).ino, name)
    return 0


async def rmdir(client: Client, args: argparse.Namespace) -> int:
    parent, name = split(args.path)
    await client.rmdir((await client.resolve(parent)).ino, name)
    return 0


async def mkdir(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    mode = stat.S_IFDIR | (0o777 & ~_umask())
    uid, gid = os.getuid(), os.getgid()
    if not args.parents:
        parent, name = split(path)
        await client.mkdir((await client.resolve(parent)).ino, name, mode, uid, gid)
        return 0
    current = await client.resolve("/")
    for part in filter(None, path.split("/")):
        name = os.fsencode(part)
        try:
            current = await client.mkdir(current.ino, name, mode, uid, gid)
        except DfsError as e:
            if e.code is not Code.EEXIST:
                raise
            current = await client.lookup(current.ino, name)
            if not current.is_dir():
                raise DfsError(Code.ENOTDIR, f"{part} exists and is not a directory") from None
    return 0


async def mv(client: Client, args: argparse.Namespace) -> int:
    src_parent, src_name = split(args.src)
    dst = cluster_path(args.dst)
    target = await _lookup(client, dst)
    if target is not None and target.is_dir():
        dst = join(dst, src_name)
    dst_parent, dst_name = split(dst)
    old = await client.resolve(src_parent)
    new = old if dst_parent == src_parent else await client.resolve(dst_parent)
    await client.rename(old.ino, src_name, new.ino, dst_name)
    return 0


# ---------------------------------------------------------------- parsers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "ls", with_client(ls), "list a directory (or show one file)")
    p.add_argument("path", nargs="?", default="/", metavar="PATH")
    add_json(p)
    p = command(subparsers, "stat", with_client(stat_), "show a file's attributes and replicas")
    p.add_argument("path", metavar="PATH")
    add_json(p)
    p = command(subparsers, "cat", with_client(cat), "write a file to standard output")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--version", type=int, metavar="N",
                   help="a kept version instead of the current one (dfs versions PATH)")
    p = command(subparsers, "get", with_client(get), "copy a file out of the cluster")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--version", type=int, metavar="N",
                   help="a kept version instead of the current one (dfs versions PATH)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="local file (replaced whole, by a rename), directory, device or FIFO "
                   "(written into), - = stdout")
    p.add_argument("more", nargs="*", metavar="PATH", help="with --consistent: PATH... DESTDIR")
    p.add_argument("--consistent", action="store_true",
                   help="PATH... DESTDIR: read every PATH at one decision point (all before "
                        "or all after any multi-file commit) into DESTDIR")
    p = command(subparsers, "put", with_client(put), "store a file (one atomic new version)",
                epilog="dfs put --atomic SRC DST [SRC DST ...] [--if-version DST=N ...] "
                       "replaces every DST in ONE commit: all of them, or (exit 1, one line "
                       "saying why, e.g. which file is at which version) none.")
    p.add_argument("src", metavar="SRC", help="local file, - = standard input")
    p.add_argument("path", metavar="PATH", help="cluster file (created if missing) or directory")
    p.add_argument("more", nargs="*", metavar="SRC DST", help="more pairs (with --atomic)")
    p.add_argument("--atomic", action="store_true",
                   help="every SRC DST pair in one multi-file commit: all or none")
    p.add_argument(
        "--if-version", action="append", metavar="N|DST=N",
        help="commit only if the file is still at version N (else CONFLICT); with --atomic "
             "DST=N, repeatable (0: DST must not exist)",
    )
    add_json(p)
    p = command(subparsers, "rm", with_client(rm), "remove a file")
    p.add_argument("path", metavar="PATH")
    p = command(subparsers, "mkdir", with_client(mkdir), "make a directory")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-p", "--parents", action="store_true", help="make parents, exist is ok")
    p = command(subparsers, "rmdir", with_client(rmdir), "remove an empty directory")
    p.add_argument("path", metavar="PATH")
    p = command(
        subparsers, "mv", with_client(mv), "rename or move (replaces DST atomically)", subject="src"
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
