"""Version history commands: `dfs versions PATH`, `dfs restore PATH --version N`
(docs/coordinator.md, "Version history"; `dfs cat/get --version N` live in files.py)."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from dfs.cli.common import add_json, cluster_path, command, print_json, show, with_client
from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client import Attr, Client


async def _file(client: Client, path: str) -> Attr:
    attr = await client.resolve(cluster_path(path))
    if not attr.is_file():
        raise DfsError(Code.EISDIR if attr.is_dir() else Code.EINVAL,
                       f"{path} is no regular file: only files have versions")
    return attr


def _row(attr: Attr, current: bool) -> dict:
    return {"version": attr.version, "size": attr.size,
            "checksum": attr.checksum.hex() if attr.checksum is not None else None,
            "mtime_ns": attr.mtime_ns, "txid": attr.blob, "replicas": list(attr.replicas),
            "current": current}


async def versions(client: Client, args: argparse.Namespace) -> int:
    current = await _file(client, args.path)
    rows = [_row(current, True)] + [_row(a, False) for a in await client.versions(current.ino)]
    if args.json:
        print_json({"path": cluster_path(args.path), "versions": rows})
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("version", "size", "checksum", "mtime", "txid", ""):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for row in rows:
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["mtime_ns"] / 1e9))
        table.add_row(f"v{row['version']}", str(row["size"]), (row["checksum"] or "-")[:16],
                      mtime, str(row["txid"] or "-"), "current" if row["current"] else "")
    show(table)
    return 0


async def restore(client: Client, args: argparse.Namespace) -> int:
    current = await _file(client, args.path)
    attr = await client.restore(current.ino, args.version)
    if args.json:
        print_json({"path": cluster_path(args.path), "restored": args.version,
                    **attr.to_json()})
    else:
        print(f"{cluster_path(args.path)}: version {args.version} restored as version "
              f"{attr.version}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "versions", with_client(versions),
                "list a file's versions (the current one and those kept)",
                epilog="A file keeps its last K versions when the coordinator runs with "
                       "--keep-versions K or a directory above it has the xattr "
                       "user.dfs.keep_versions=K. Read one with dfs cat PATH --version N.")
    p.add_argument("path", metavar="PATH")
    add_json(p)
    p = command(subparsers, "restore", with_client(restore),
                "make a kept version the file's current content again (no data copied)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--version", type=int, required=True, metavar="N",
                   help="the version to restore (dfs versions PATH lists them)")
    add_json(p)
