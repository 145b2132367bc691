"""`dfs snapshot create|list|delete` (docs/coordinator.md, "Snapshots").

A snapshot's files are read like any others, at PATH/.snapshots/NAME/...: `dfs ls`, `dfs cat`
and `dfs get` take such paths, and so does a mount.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

from dfs.cli.common import add_json, cluster_path, command, print_json, show, size_text, with_client

if TYPE_CHECKING:
    from dfs.client import Client


async def create(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    reply = await client.snapshot_create(path, os.fsencode(args.name))
    snap = reply["snapshot"]
    if args.json:
        print_json({**snap, "seconds": reply["seconds"], "pieces": reply["pieces"]})
    else:
        print(f"{path}/.snapshots/{snap['name']}: {snap['inodes']} inodes, "
              f"{size_text(snap['bytes'])} in {reply['seconds']:.2f} s")
    return 0


async def list_(client: Client, args: argparse.Namespace) -> int:
    snaps = await client.snapshot_list(cluster_path(args.path) if args.path else None)
    if args.json:
        print_json({"snapshots": snaps})
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("path", "name", "created", "inodes", "bytes"):
        table.add_column(column, justify="right" if column in ("inodes", "bytes") else "left")
    for s in snaps:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_ns"] / 1e9))
        table.add_row(s["path"], s["name"], created, str(s["inodes"]), size_text(s["bytes"]))
    show(table)
    return 0


async def delete(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    reply = await client.snapshot_delete(path, os.fsencode(args.name))
    if args.json:
        print_json(reply["snapshot"])
    else:
        print(f"{path}/.snapshots/{args.name} deleted")
    return 0


async def restore(client: Client, args: argparse.Namespace) -> int:
    path = cluster_path(args.path)
    reply = await client.snapshot_restore(path, os.fsencode(args.name))
    if args.json:
        print_json(reply)
    else:
        print(f"{path}: restored to snapshot {args.name} ({reply['rewritten']} files rewritten, "
              f"{reply['recreated']} recreated, {reply['removed']} names removed, "
              f"{reply['added']} added)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "snapshot", help="read-only point-in-time copies of a subtree",
        description="Snapshots copy a subtree's metadata in one point in time (blobs are "
                    "shared, nothing is copied on the nodes). Read them at "
                    "PATH/.snapshots/NAME, with dfs ls/cat/get or through a mount.")
    sub = p.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    c = command(sub, "create", with_client(create), "snapshot the subtree at PATH as NAME")
    c.add_argument("path", metavar="PATH")
    c.add_argument("name", metavar="NAME")
    add_json(c)
    c = command(sub, "list", with_client(list_), "list snapshots (of PATH, or all)")
    c.add_argument("path", nargs="?", metavar="PATH")
    add_json(c)
    c = command(sub, "restore", with_client(restore),
                "make the subtree at PATH what snapshot NAME holds (one transaction)")
    c.add_argument("path", metavar="PATH")
    c.add_argument("name", metavar="NAME")
    add_json(c)
    c = command(sub, "delete", with_client(delete), "delete the snapshot NAME of PATH")
    c.add_argument("path", metavar="PATH")
    c.add_argument("name", metavar="NAME")
    add_json(c)
