"""`dfs mount MOUNTPOINT` and `dfs umount MOUNTPOINT`, owned by fuse_mount (docs/design.md §7).

Registered only where fuse_mount has its entry point; imported only when one of these runs, so
pyfuse3 never slows down other commands.
"""

from __future__ import annotations

import argparse
import importlib.util

from dfs.cli.servers import delegated_parser, load_module
from dfs.errors import Code, DfsError

MODULE = "fuse_mount.main"


def mount(args: argparse.Namespace) -> int:
    mod = load_module(MODULE, "add_mount_arguments", "run")
    parser = delegated_parser("dfs mount", "mount the cluster (FUSE)", mod, "add_mount_arguments")
    parser.parse_args(args.rest, namespace=args)
    if mod is None:
        raise DfsError(Code.UNAVAILABLE, "mount not available in this install")
    return int(mod.run(args) or 0)


def umount(args: argparse.Namespace) -> int:
    mod = load_module(MODULE, "add_umount_arguments", "umount")
    parser = delegated_parser("dfs umount", "unmount a dfs mount", mod, "add_umount_arguments")
    parser.parse_args(args.rest, namespace=args)
    if mod is None:
        raise DfsError(Code.UNAVAILABLE, "umount not available in this install")
    return int(mod.umount(args) or 0)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    if importlib.util.find_spec(MODULE) is None:
        return
    for name, handler, help in (
        ("mount", mount, "mount the cluster at MOUNTPOINT (see dfs mount -h)"),
        ("umount", umount, "unmount MOUNTPOINT"),
    ):
        stub = subparsers.add_parser(name, help=help, add_help=False)
        stub.set_defaults(func=handler, passthrough=True, subject="mountpoint")
