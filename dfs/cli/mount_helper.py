"""`mount.dfs` and `umount.fuse.dfs`: what mount(8) and umount(8) run for dfs mounts.

See docs/operations.md.

mount(8) runs `mount.dfs SPEC DIR [-sfnv] [-N NS] [-o OPTS]`, SPEC being the coordinators
(HOST:PORT[,HOST:PORT]). This becomes `dfs mount DIR --coordinator SPEC ...` in the
background: it returns once the mount answers. Options: `secret_file=F` (default
/etc/dfs/secret), `ro`, and every `dfs mount` option with `_` or `-` (`cache_dir=/var/cache/x`,
`page_cache`, `log_format=json`, `tls_cert=F,tls_key=F,tls_ca=F`); mount(8)'s generic options (`_netdev`, `defaults`, `noauto`,
`nofail`, `rw`, `x-systemd.*`, ...) are ignored; any other is an error (ignored with -s).

umount(8) runs `umount.fuse.dfs DIR [-nlfvr]` for every mount of type fuse.dfs (libmount
looks for umount.TYPE before unmounting itself): `dfs umount DIR`, which waits until the mount
process has committed what it held and exited.

Exit status as mount(8) documents for helpers: 0 mounted, 1 bad usage, 32 mount failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dfs.cli import main as cli

EX_USAGE = 1
EX_FAIL = 32
DEFAULT_SECRET = Path("/etc/dfs/secret")
# mount(8)'s own options and ones meant for other tools: accepted and ignored.
GENERIC = {
    "defaults", "_netdev", "auto", "noauto", "nofail", "rw", "user", "nouser", "users", "owner",
    "group", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime", "diratime",
    "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "async", "sync", "silent", "loud", "nomand", "helper",
}
GENERIC_PREFIXES = ("x-", "comment=", "helper=", "uhelper=", "context=", "fscontext=")


class HelperUsage(Exception):
    """A bad mount.dfs invocation: exit 1 with this line."""


def _mount_options() -> dict[str, argparse.Action]:
    """dfs mount's own options, by dest (cache_dir, page_cache, ...)."""
    from fuse_mount.main import add_mount_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_mount_arguments(parser)
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "foreground"}


def translate(spec: str, directory: str, options: str, *, sloppy: bool = False) -> list[str]:
    """The `dfs` argv for `mount.dfs SPEC DIR -o OPTIONS`."""
    known = _mount_options()
    secret: str | None = None
    argv: list[str] = []
    for option in filter(None, (o.strip() for o in options.split(","))):
        name, has_value, value = option.partition("=")
        key = name.replace("-", "_")
        if key == "secret_file":
            secret = value
        elif key in ("log_format", "coordinator", "tls_cert", "tls_key", "tls_ca"):
            argv += [f"--{key.replace('_', '-')}", value]
        elif option == "ro":
            argv.append("--read-only")
        elif key in known:
            action = known[key]
            flag = action.option_strings[-1]
            takes_value = action.nargs != 0
            if takes_value != bool(has_value):
                raise HelperUsage(f"option {name} {'needs' if takes_value else 'takes no'} value")
            argv += [flag, value] if takes_value else [flag]
        elif option in GENERIC or option.startswith(GENERIC_PREFIXES) or sloppy:
            continue
        else:
            raise HelperUsage(f"unknown option {option}")
    if secret is None and os.environ.get("DFS_SECRET_FILE") is None and DEFAULT_SECRET.exists():
        secret = str(DEFAULT_SECRET)
    common = ["--coordinator", spec] + (["--secret-file", secret] if secret else [])
    return [*common, "mount", os.path.abspath(directory), *argv]


def _parse(argv: list[str], flags: str, with_spec: bool) -> tuple[list[str], dict[str, str]]:
    """mount(8)'s helper calling convention: positionals, then short flags with -o/-N/-t."""
    positional: list[str] = []
    seen: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg.startswith("-") and len(arg) > 1:
            for i, letter in enumerate(arg[1:], 1):
                if letter in "oNt":
                    seen[letter] = arg[i + 1:] or next(args, "")
                    break
                if letter not in flags:
                    raise HelperUsage(f"unknown flag -{letter}")
                seen[letter] = ""
        else:
            positional.append(arg)
    if len(positional) != (2 if with_spec else 1):
        what = "SPEC DIR" if with_spec else "DIR"
        raise HelperUsage(f"usage: {'mount.dfs' if with_spec else 'umount.fuse.dfs'} {what}")
    return positional, seen


def mount_main(argv: list[str] | None = None) -> int:
    """`mount.dfs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS]`."""
    try:
        (spec, directory), flags = _parse(list(sys.argv[1:] if argv is None else argv),
                                          "sfnvi", True)
        dfs_argv = translate(spec, directory, flags.get("o", ""), sloppy="s" in flags)
    except HelperUsage as e:
        print(f"mount.dfs: {e}", file=sys.stderr)
        return EX_USAGE
    if "N" in flags:
        print("mount.dfs: -N (another mount namespace) is not supported", file=sys.stderr)
        return EX_USAGE
    if "v" in flags:
        print("mount.dfs: dfs " + " ".join(dfs_argv), file=sys.stderr)
    if "f" in flags:  # fake: everything but the mount itself
        return 0
    status = cli.main(dfs_argv)
    return {0: 0, 2: EX_USAGE}.get(status, EX_FAIL)


def umount_main(argv: list[str] | None = None) -> int:
    """`umount.fuse.dfs DIR [-nlfvr] [-t TYPE]`: unmount and wait for the commits."""
    try:
        (directory,), flags = _parse(list(sys.argv[1:] if argv is None else argv), "nlfvr", False)
    except HelperUsage as e:
        print(f"umount.fuse.dfs: {e}", file=sys.stderr)
        return EX_USAGE
    status = cli.main(["umount", directory, *(["--lazy"] if "l" in flags else [])])
    return {0: 0, 2: EX_USAGE}.get(status, EX_FAIL)


if __name__ == "__main__":
    sys.exit(mount_main())
