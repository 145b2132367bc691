"""`dfs local up`: a whole cluster on this machine, in the foreground, for trying dfs out.

DIR/secret (32 random bytes, hex), DIR/coordinator and DIR/node-1 .. DIR/node-N as data dirs,
DIR/*.log for each child's output. With `--ha`: three etcd members under DIR/etcd/ and two
coordinators (DIR/coordinator-1, -2: caches of etcd) at the first two --coordinator addresses
(one given: it and the next port); nodes and the mount are given both (docs/operations.md,
"Standby coordinators"). Once up, a server child that dies is started again at a bounded
rate (procs.Supervisor), so a killed leader leaves the standby serving, as in production; a
mount that dies is reported only (a dead FUSE mount must be unmounted first: the user's
call). A child that dies while the cluster starts stops the rest and exits 1. Ctrl-C or
SIGTERM stops every child and exits 0; the children die with it even when it is killed
with SIGKILL (procs.die_with). `--log-format` reaches every child. With `--tls`:
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
from typing import NoReturn

from dfs import sdnotify
from dfs.cli.common import UsageError, command, option_source
from dfs.cli.etcd_members import LocalEtcd, MemberTls
from dfs.cli.procs import DFS, RESTART_MAX_S, RESTART_MIN_S, STABLE_S, Child, Supervisor
from dfs.client.leader import split_addresses
from dfs.errors import Code, DfsError
from dfs.rpc import join_address, parse_address

READY_TIMEOUT = 30.0
POLL_S = 0.2  # how often the running cluster's children are looked at
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
             tls: LocalTls | None = None, unused: str = "") -> str:
    lines = [f"dfs local cluster up in {root}/ (logs: {root}/*.log)"]
    for c in children:
        where = c.address or (str(Path(args.mount).resolve()) if c.name == "mount" else "")
        lines.append(f"  {c.name:<12} {where:<22} pid {c.pid}")
    lines += [
        "use it from another shell:",
        f"  export DFS_COORDINATOR={args.coordinator} DFS_SECRET_FILE={secret.resolve()}"
        + (tls.export() if tls else ""),
        "  dfs put ./some-file /some-file && dfs ls / && dfs cat /some-file && dfs status",
        "A server that dies is started again; Ctrl-C stops the cluster (its data stays in "
        "the directory).",
    ]
    if unused:
        lines.insert(1 + len(children), f"  ({unused})")
    return "\n".join(lines)


def up(args: argparse.Namespace) -> int:
    if args.mount and not mount_available():
        raise DfsError(Code.UNAVAILABLE, "mount not available yet")
    given = args.coordinator
    listens, rest = _coordinator_addresses(given, 2 if args.ha else 1)
    source = option_source(given, "--coordinator")
    unused = f"not used: {','.join(rest)} of {source}" if rest else ""
    args.coordinator = ",".join(listens)
    # What the children are told, on their command lines and in their environment alike.
    os.environ["DFS_COORDINATOR"] = args.coordinator
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    secret = ensure_secret(root)
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
    supervisor = Supervisor(_report)
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
        for child in children:
            supervisor.watch(child)
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
            supervisor.watch(mount, restart=False, note=(
                f": `dfs mount {mountpoint}` mounts the cluster again (after `dfs umount "
                f"{mountpoint}` if it still shows as mounted)"))
        print(_summary(args, root, secret, children, local_tls, unused), flush=True)
        if notify_socket:
            os.environ[sdnotify.ENV] = notify_socket
            sdnotify.ready(f"cluster up in {root}")
        _supervise(supervisor)
    except (Stop, KeyboardInterrupt):
        print("\nstopping the cluster", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _report(line: str) -> None:
    print(f"dfs local: {line}", file=sys.stderr, flush=True)


def _supervise(supervisor: Supervisor) -> NoReturn:
    """Until SIGTERM or SIGINT (then Stop): the children that die are started again. Here
    those signals only set a flag, so that a stop never cuts a restart short between the
    fork and the noting of its pid: every child started is stopped by its pid."""
    stop: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    while not stop:
        supervisor.check()
        time.sleep(POLL_S)
    raise Stop()


def _coordinator_addresses(given: str, count: int) -> tuple[list[str], list[str]]:
    """The addresses of `count` coordinators, and those of `given` left unused: the given
    ones in order (an exported DFS_COORDINATOR of an earlier `local up --ha` is such a
    list), then the ports after the last one."""
    addresses = split_addresses(given)  # each checked by the --coordinator parser
    listens = addresses[:count]
    host, port = parse_address(listens[-1])
    while len(listens) < count:
        port += 1
        if port > 65535:
            raise UsageError(f"{option_source(given, '--coordinator')}: {given}: no port "
                             "after it for the next coordinator")
        listens.append(join_address(host, port))
    return listens, addresses[count:]


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
addresses:
  The coordinator serves at the first address of --coordinator (or DFS_COORDINATOR;
  default 127.0.0.1:7700); with --ha the second one at the second address, or at the
  port after the first. Further addresses are not used. Every process started here is
  given exactly these addresses, whatever the environment says.

restarts:
  A server that dies (an etcd member, a coordinator, a node) is started again after
  {RESTART_MIN_S:g} s; the pause doubles up to {RESTART_MAX_S:g} s while it keeps dying soon
  (within {STABLE_S:g} s) after its start. The others keep serving meanwhile (with --ha the
  other coordinator takes over). A mount (--mount) that dies is reported, not restarted.
  Each death and each restart is one line on stderr. Ctrl-C or SIGTERM stops every
  child, by its pid.
""",
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
