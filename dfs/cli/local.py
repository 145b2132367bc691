"""`dfs local up`: a whole cluster on this machine, in the foreground, for trying dfs out.

DIR/secret (32 random bytes, hex), DIR/coordinator and DIR/node-1 .. DIR/node-N as data dirs,
DIR/*.log for each child's output. With `--ha`: three etcd members under DIR/etcd/ and two
coordinators (DIR/coordinator-1, -2: caches of etcd) on the --coordinator port and the next
one; nodes and the mount are given both (docs/coordinator.md, "Standby coordinators"). Ctrl-C or SIGTERM stops every child and exits 0; a child
that dies on its own stops the rest and exits 1. The children die with it even when it is
killed with SIGKILL (procs.die_with). `--log-format` reaches every child. With `--tls`:
a throwaway CA under DIR/tls/ (dfs/tls_local.py) and a certificate for every child and for
the commands run against the cluster (DIR/tls/client.*, printed as DFS_TLS_* to export);
with `--ha` the etcd members too (TLS client and peer links; the coordinators use etcds://).
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from dfs import sdnotify
from dfs.cli.common import command
from dfs.cli.etcd_members import LocalEtcd, MemberTls
from dfs.cli.procs import DFS, Child
from dfs.errors import Code, DfsError
from dfs.rpc import parse_address

READY_TIMEOUT = 30.0
ETCD_MEMBERS = 3  # --ha: a majority survives one member's loss


class Stop(Exception):
    """SIGTERM (or SIGINT) asked the cluster to stop."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop()


def ensure_secret(directory: Path) -> Path:
    path = directory / "secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


def mount_available() -> bool:
    """True once fuse_mount has a runnable mount (fuse_mount.main.run)."""
    try:
        module = importlib.import_module("fuse_mount.main")
    except ImportError:
        return False
    return callable(getattr(module, "run", None))


def wait_nodes_up(coordinator: str, secret_file: Path, count: int, children: list[Child]) -> None:
    """Poll the coordinator until `count` nodes are registered and up."""
    import trio

    from dfs.client import Client
    from dfs.rpc import load_secret

    secret = load_secret(secret_file)

    async def poll() -> None:
        async with Client(coordinator, secret, retry_for=0) as client:
            with trio.fail_after(READY_TIMEOUT):
                while True:
                    for child in children:
                        if child.poll() is not None:
                            raise DfsError(
                                Code.UNAVAILABLE, f"{child.name} exited: {child.log_tail(3)}"
                            )
                    try:
                        nodes = (await client.status()).get("nodes", [])
                        if sum(n.get("state") == "up" for n in nodes) >= count:
                            return
                    except DfsError as e:
                        if e.code is not Code.UNAVAILABLE:
                            raise
                    await trio.sleep(0.1)

    try:
        trio.run(poll)
    except trio.TooSlowError:
        raise DfsError(
            Code.UNAVAILABLE, f"{count} nodes did not come up within {READY_TIMEOUT:.0f}s"
        ) from None


class LocalTls:
    """`--tls`: the CA and per-process certificates of a local cluster, as child arguments."""

    def __init__(self, root: Path, coordinator: str) -> None:
        from dfs import tls, tls_local

        self.dir = (root / "tls").resolve()
        self.hosts = tls_local.local_hosts(*{parse_address(a)[0] for a in coordinator.split(",")})
        self.ca = tls_local.make_ca(self.dir)
        self.client = tls_local.make_cert(self.dir, "client", self.hosts)
        tls.install(tls.TlsConfig(self.ca, *self.client))  # this process polls the cluster

    def args(self, name: str) -> list[str]:
        from dfs import tls_local

        cert, key = tls_local.make_cert(self.dir, name, self.hosts)
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.ca)]

    def member(self, name: str) -> MemberTls:
        """An etcd member's files (`--ha`): the links to etcd and between members are TLS
        too, with certificates of the same CA."""
        from dfs import tls_local

        cert, key = tls_local.make_cert(self.dir, name, self.hosts)
        return MemberTls(cert, key, self.ca)

    def export(self) -> str:
        cert, key = self.client
        return f" DFS_TLS_CERT={cert} DFS_TLS_KEY={key} DFS_TLS_CA={self.ca}"


def _summary(args: argparse.Namespace, root: Path, secret: Path, children: list[Child],
             tls: LocalTls | None = None) -> str:
    lines = [f"dfs local cluster up in {root}/ (logs: {root}/*.log)"]
    for c in children:
        where = c.address or (str(Path(args.mount).resolve()) if c.name == "mount" else "")
        lines.append(f"  {c.name:<12} {where:<22} pid {c.pid}")
    lines += [
        "use it from another shell:",
        f"  export DFS_COORDINATOR={args.coordinator} DFS_SECRET_FILE={secret.resolve()}"
        + (tls.export() if tls else ""),
        "  dfs put ./some-file /some-file && dfs ls / && dfs cat /some-file && dfs status",
        "Ctrl-C stops the cluster (its data stays in the directory).",
    ]
    return "\n".join(lines)


def up(args: argparse.Namespace) -> int:
    if args.mount and not mount_available():
        raise DfsError(Code.UNAVAILABLE, "mount not available yet")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    secret = ensure_secret(root)
    listens = _coordinator_addresses(args.coordinator, 2 if args.ha else 1)
    args.coordinator = ",".join(listens)
    common = ["--coordinator", args.coordinator, "--secret-file", str(secret.resolve()),
              "--log-format", getattr(args, "log_format", None) or "text"]
    local_tls = LocalTls(root, args.coordinator) if args.tls else None

    def tls_args(name: str) -> list[str]:
        return local_tls.args(name) if local_tls else []

    children: list[Child] = []
    # Under systemd it is the cluster that is ready, once all of it is: not each child.
    notify_socket = os.environ.pop(sdnotify.ENV, None)
    signal.signal(signal.SIGTERM, _raise_stop)
    etcd: LocalEtcd | None = None
    try:
        meta: list[str] = []
        if args.ha:
            etcd = LocalEtcd(root, ETCD_MEMBERS,
                             tls=local_tls.member if local_tls is not None else None)
            children.extend(etcd.children)
            etcd.start()
            meta = ["--meta", etcd.url]
        for i, listen in enumerate(listens, 1):
            name = f"coordinator-{i}" if args.ha else "coordinator"
            coordinator = Child(
                name,
                [*DFS, *common, *tls_args(name), "coordinator", "--data", str(root / name),
                 "--listen", listen, "--replicas", str(args.replicas), *meta],
                root / f"{name}.log", die_with_parent=True,
            )
            children.append(coordinator)
            coordinator.start()
            coordinator.wait_listening(READY_TIMEOUT)
        nodes = [
            Child(
                f"node-{i}",
                [*DFS, *common, *tls_args(f"node-{i}"), "node", "--data",
                 str(root / f"node-{i}"),
                 "--listen", "127.0.0.1:0"],
                root / f"node-{i}.log", die_with_parent=True,
            )
            for i in range(1, args.nodes + 1)
        ]
        children.extend(nodes)
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_listening(READY_TIMEOUT)
        wait_nodes_up(args.coordinator, secret, args.nodes, children)
        if args.mount:
            mountpoint = Path(args.mount).resolve()
            mountpoint.mkdir(parents=True, exist_ok=True)
            extra = ["--page-cache"] if args.page_cache else []
            mount = Child(
                "mount", [*DFS, *common, *tls_args("mount"), "mount", str(mountpoint),
                          "--foreground", *extra],
                root / "mount.log", die_with_parent=True,
            )
            children.append(mount)
            mount.start()
            _wait_mounted(mount, mountpoint)
        print(_summary(args, root, secret, children, local_tls), flush=True)
        if notify_socket:
            os.environ[sdnotify.ENV] = notify_socket
            sdnotify.ready(f"cluster up in {root}")
        while True:
            for child in children:
                status = child.poll()
                if status is not None:
                    raise DfsError(
                        Code.UNAVAILABLE,
                        f"{child.name} exited with status {status}: {child.log_tail(3)}",
                    )
            time.sleep(0.2)
    except (Stop, KeyboardInterrupt):
        print("\nstopping the cluster", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _coordinator_addresses(first: str, count: int) -> list[str]:
    """`count` coordinator addresses: the given one, then the ports after it."""
    if count == 1:
        return [first]
    host, port = parse_address(first)
    if port == 0:
        raise DfsError(Code.EINVAL, "--ha needs a fixed --coordinator port: the nodes and "
                                    "mounts are given every coordinator's address")
    return [f"{host}:{port + i}" for i in range(count)]


def _wait_mounted(mount: Child, mountpoint: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not os.path.ismount(mountpoint):
        status = mount.poll()
        if status is not None:
            raise DfsError(Code.UNAVAILABLE, f"mount exited with status {status}: "
                           f"{mount.log_tail(3)}")
        if time.monotonic() > deadline:
            raise DfsError(Code.UNAVAILABLE, f"{mountpoint} is not mounted after "
                           f"{READY_TIMEOUT:.0f}s")
        time.sleep(0.05)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    local = subparsers.add_parser("local", help="a whole cluster on this machine")
    local_commands = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")
    p = command(
        local_commands, "up", up,
        "run a coordinator and N nodes here, in the foreground (Ctrl-C stops them)",
        subject="dir",
    )
    p.add_argument("--dir", default=".dfs", help="data, logs and secret (default %(default)s)")
    p.add_argument("--nodes", type=int, default=3, help="storage nodes (default %(default)s)")
    p.add_argument("--replicas", type=int, default=3, help="replicas R (default %(default)s)")
    p.add_argument("--mount", metavar="DIR", help="also mount the cluster at DIR")
    p.add_argument("--page-cache", action="store_true",
                   help="with --mount: mount with --page-cache (see dfs mount -h)")
    p.add_argument("--tls", action="store_true",
                   help="TLS on every dfs link: a throwaway CA and certificates under DIR/tls/ "
                        "(needs the openssl command; etcd links stay plain)")
    p.add_argument("--ha", action="store_true",
                   help="metadata on 3 local etcd members and 2 coordinators (one leads)")
