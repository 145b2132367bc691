"""`dfs mount MOUNTPOINT` and `dfs umount MOUNTPOINT` (docs/design.md §11).

The CLI registers these through `add_mount_arguments` / `run` and `add_umount_arguments` /
`umount`; the global `--coordinator` and `--secret-file` land on the same namespace.

Without --foreground the command forks: the child mounts and serves, the parent waits until the
child reports the mount ready (a stat of the mount point was answered) or failed through a
pipe, prints the same line and exits, so `dfs mount X && ls X` works in scripts. Either way the
ready line is "dfs mount ready at MOUNTPOINT", and systemd hears READY=1 at that moment.
SIGINT/SIGTERM serve on for --stop-timeout while open files hold unfinished writes, then end
the FUSE loop, drop what is still unfinished (never commit it) and unmount cleanly. The
serving process holds locked pid files (fuse_mount/daemon.py) that `dfs umount` waits on.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import trio

from dfs import logs, sdnotify
from dfs.client import Client
from dfs.client.leader import split_addresses
from dfs.errors import Code, DfsError
from dfs.metrics.http import add_metrics_argument, bind_metrics, serve_metrics_on
from dfs.metrics.mount import MountMetrics
from dfs.rpc import load_secret
from fuse_mount.cache import ReadCache
from fuse_mount.conflict import CHOICES, OVERWRITE
from fuse_mount.daemon import (
    EXIT_TIMEOUT,
    PidFile,
    device_pid_file,
    mount_device,
    wait_released,
)
from fuse_mount.operations import Operations
from fuse_mount.spool import clear_directory
from fuse_mount.verify import ClientSource
from fuse_mount.virtual_ops import MountOperations

log = logging.getLogger("fuse_mount")

READY = "dfs mount ready at {}"
CONNECT_TIMEOUT = 15.0
#: How long a detached mount's parent waits for the child to answer before giving up on it.
READY_TIMEOUT = CONNECT_TIMEOUT + 30.0
#: The mount's read-ahead window: one FUSE request of the chunk size per page-cache miss.
READ_AHEAD_KB = 1024
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in SIZE_UNITS and not value[-1:].isdigit() else ""
    number = value[: len(value) - len(unit)]
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: want e.g. 512M or 2G") from None


#: How often a stopping mount looks whether its writers have finished.
STOP_POLL_S = 0.05


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", help="an existing empty directory")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (default: detach once mounted)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="local read cache and write spools "
                             "(default $XDG_CACHE_HOME/dfs/mount-<name>)")
    parser.add_argument("--cache-size", type=parse_size, default=parse_size("1G"),
                        help="read cache cap (default 1G)")
    parser.add_argument("--attr-timeout", type=float, default=1.0,
                        help="seconds the kernel caches attributes and entries (default 1)")
    parser.add_argument("--retry-timeout", type=float, default=30.0,
                        help="seconds to retry while the cluster is unreachable, then EIO")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="on SIGTERM/SIGINT, seconds to keep serving while open files hold "
                             "writes no close has committed, so their writers can finish; "
                             "then the mount stops and drops what is still unfinished (the "
                             "files keep their last finished version; each one is logged). "
                             "A second signal stops at once (default 10)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="log here (default: stderr; CACHE_DIR/mount.log when detached)")
    parser.add_argument("--page-cache", action="store_true",
                        help="let the kernel page cache hold file data where one version per "
                             "inode allows it: MAP_SHARED mmap works and re-reads cost nothing; "
                             "but a writer's first open of a file page-cached readers hold on "
                             "this host may change their size mid-read (docs/mount.md, "
                             "\"Page cache\"). Default off: every file is direct_io, shared "
                             "writable mmap fails with ENODEV")
    parser.add_argument("--debug", action="store_true", help="log every failed request")
    parser.add_argument("--pid-file", type=Path, default=None,
                        help="write the serving process's pid here (removed when it exits)")
    parser.add_argument("--read-only", action="store_true",
                        help="mount read-only (the kernel refuses every write: EROFS)")
    parser.add_argument("--on-conflict", choices=CHOICES, default=OVERWRITE,
                        help="when another writer committed a file after this handle opened "
                             "it: 'overwrite' (default) is last-writer-wins; 'fail' refuses "
                             "the handle's commit, close()/fsync() return ESTALE and the other "
                             "writer's version stays. A directory's xattr user.dfs.on_conflict "
                             "(fail|overwrite, inherited by subdirectories) overrides it "
                             "(docs/mount.md, \"Conflicting writers\")")
    add_metrics_argument(parser)


def add_umount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint")
    parser.add_argument("-z", "--lazy", action="store_true",
                        help="detach now even if files are open")


def default_cache_dir(mountpoint: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = str(mountpoint).strip("/").replace("/", "_") or "root"
    return base / "dfs" / f"mount-{tag}"


def mount_options(read_only: bool = False) -> set[str]:
    """fsname/subtype name the mount in /proc/mounts; default_permissions lets the kernel do
    the mode checks; allow_other (other users may enter) only where it is permitted."""
    options = set(pyfuse3.default_options) | {"fsname=dfs", "subtype=dfs", "default_permissions"}
    if read_only:
        options.add("ro")
    if os.geteuid() == 0 or _user_allow_other():
        options.add("allow_other")
    return options


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    """`dfs mount`: 0 once mounted (detached) or after a clean unmount (foreground)."""
    mountpoint = Path(os.path.abspath(args.mountpoint))
    if is_mounted(mountpoint):
        raise DfsError(Code.EEXIST, f"{mountpoint} is already a mount point")
    mountpoint = mountpoint.resolve()
    if not mountpoint.is_dir():
        raise DfsError(Code.ENOTDIR, f"{args.mountpoint} is not a directory")
    secret = load_secret(getattr(args, "secret_file", None))
    cache_dir = (args.cache_dir or default_cache_dir(mountpoint)).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.foreground:
        _setup_logging(args.log_file, args.debug, getattr(args, "log_format", None))
        return _serve(args, mountpoint, cache_dir, secret, _Notify(None))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: detach, mount, serve
        os.close(read_end)
        code = 1
        try:
            os.setsid()
            _detach_stdio()
            _setup_logging(args.log_file or cache_dir / "mount.log", args.debug,
                           getattr(args, "log_format", None))
            code = _serve(args, mountpoint, cache_dir, secret, _Notify(write_end))
        except BaseException:
            log.exception("mount failed")
        finally:
            os._exit(code)
    os.close(write_end)
    log_file = args.log_file or cache_dir / "mount.log"
    message = _read_line(read_end, READY_TIMEOUT)
    if message is None:  # it never answered: stop it rather than leave a hung mount behind
        os.kill(pid, signal.SIGTERM)
        raise DfsError(Code.UNAVAILABLE, f"{mountpoint} did not answer within "
                                         f"{READY_TIMEOUT:.0f}s (log: {log_file})")
    if message.startswith("ready"):
        print(READY.format(mountpoint), flush=True)
        return 0
    os.waitpid(pid, 0)
    raise DfsError(Code.UNAVAILABLE, message.removeprefix("error: ")
                   or f"the mount process died (log: {log_file})")


def _read_line(fd: int, timeout: float) -> str | None:
    """The child's one line ("" if it died without one); None if nothing came in time."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


class _Notify:
    """Tells whoever waits (the terminal, or the parent through a pipe) ready or failed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd is None:
            print(line, flush=True)
            return
        try:
            os.write(self.fd, (line + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ready(self, mountpoint: Path) -> None:
        if self.fd is None:
            self._send(READY.format(mountpoint))
        else:
            self._send("ready")

    def failed(self, why: str) -> None:
        if self.fd is None:
            print(f"dfs: mount: {why}", file=sys.stderr, flush=True)
        else:
            self._send(f"error: {why}")


def _serve(
    args: argparse.Namespace, mountpoint: Path, cache_dir: Path, secret: bytes, notify: _Notify
) -> int:
    held: list[PidFile] = []
    try:
        return trio.run(_amain, args, mountpoint, cache_dir, secret, notify, held)
    except DfsError as e:
        notify.failed(e.msg)
        return 1
    finally:
        for pid_file in held:  # last: an unmount waiting on these returns after the commits
            pid_file.close()


async def _connect(coordinators: str, secret: bytes, retry_timeout: float) -> Client:
    """A client of the comma-separated coordinators, once the leader among them answered.

    The client's link finds the leader (a standby names it, an unreachable one is skipped) and
    keeps following it for the life of the mount, through every later failover."""
    client = Client(split_addresses(coordinators), secret, retry_for=min(retry_timeout, 15.0))
    answered = False
    try:
        with trio.move_on_after(CONNECT_TIMEOUT):
            await client.getattr(pyfuse3.ROOT_INODE)
            answered = True
    except BaseException:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise
    if not answered:
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise DfsError(Code.UNAVAILABLE, f"no answer from the coordinator {coordinators}")
    log.info("cluster at %s reachable", client.address)
    return client


async def _amain(
    args: argparse.Namespace, mountpoint: Path, cache_dir: Path, secret: bytes, notify: _Notify,
    held: list[PidFile],
) -> int:
    client = await _connect(args.coordinator, secret, args.retry_timeout)
    try:
        spool_dir = cache_dir / "spool"
        clear_directory(spool_dir)
        cache = ReadCache(cache_dir / "read", args.cache_size, ClientSource(client))
        ops = MountOperations(
            client, cache, spool_dir,
            attr_timeout=args.attr_timeout, retry_for=args.retry_timeout,
            page_cache=args.page_cache,
            on_conflict=getattr(args, "on_conflict", OVERWRITE), mountpoint=mountpoint,
        )
        listeners = await _bind_metrics(ops, cache, getattr(args, "metrics", None))
        try:
            pyfuse3.init(ops, str(mountpoint), mount_options(getattr(args, "read_only", False)))
        except RuntimeError as e:
            for listener in listeners:
                await listener.aclose()
            raise DfsError(Code.UNAVAILABLE, f"cannot mount at {mountpoint}: {e}") from None
        held.extend(_hold_pid_files(mountpoint, getattr(args, "pid_file", None)))
        return await _run_mounted(ops, cache, mountpoint, notify, listeners,
                                  stop_timeout_s=getattr(args, "stop_timeout", 10.0))
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def _bind_metrics(ops: Operations, cache: ReadCache,
                        address: str | None) -> list[trio.SocketListener]:
    """--metrics: bound before the mount exists, so a taken port fails the mount cleanly."""
    if address is None:
        return []
    ops.metrics = MountMetrics(cache)
    listeners, ops.metrics.address = await bind_metrics(address)
    log.info("metrics on %s", ops.metrics.address)
    print(f"dfs mount metrics on {ops.metrics.address}", flush=True)
    return listeners


async def _run_mounted(ops: Operations, cache: ReadCache, mountpoint: Path, notify: _Notify,
                       listeners: list[trio.SocketListener] | None = None,
                       stop_timeout_s: float = 10.0) -> int:
    stopped_by_signal = False
    unmount = True
    try:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                nonlocal stopped_by_signal
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    signum = await signals.__anext__()
                    log.info("signal %d: unmounting", signum)
                    stopped_by_signal = True
                    await _let_writers_finish(ops, signals, stop_timeout_s)
                    pyfuse3.terminate()

            nursery.start_soon(on_signals)
            nursery.start_soon(ops.run_invalidator)
            nursery.start_soon(ops.keep_unwritten)
            if ops.pages is not None:  # only page-cached reads come in read-ahead windows
                nursery.start_soon(_after_init, ops, mountpoint)
            if ops.sizeback is not None:
                nursery.start_soon(ops.sizeback.run)
            cache.start(nursery)
            if listeners and ops.metrics is not None:
                nursery.start_soon(serve_metrics_on, ops.metrics.registry, listeners)
            nursery.start_soon(_announce_ready, mountpoint, notify)
            await pyfuse3.main(min_tasks=4, max_tasks=128)
            # Unmounted from outside (fusermount3 -u) unless a signal stopped the loop.
            unmount = stopped_by_signal
            nursery.cancel_scope.cancel()
    except BaseException:
        log.exception("the FUSE loop failed")
        raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            await ops.shutdown()
        pyfuse3.close(unmount=unmount and is_mounted(mountpoint))
        log.info("unmounted %s", mountpoint)
    return 0


async def _let_writers_finish(ops: Operations, signals: AsyncIterator[int],
                              timeout_s: float) -> None:
    """Serve on, up to timeout_s, while open files hold unfinished writes (a stop commits
    none of them), or until a second signal."""
    if not ops.unfinished():
        return

    async def second_signal() -> None:
        async for signum in signals:
            log.info("signal %d: stopping now", signum)
            return

    log.info("waiting up to %.0f s for %d open file(s) with unfinished writes to be closed",
             timeout_s, ops.unfinished())
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_signal)
            while ops.unfinished():
                await trio.sleep(STOP_POLL_S)
            nursery.cancel_scope.cancel()


def _hold_pid_files(mountpoint: Path, pid_file: Path | None) -> list[PidFile]:
    """The pid file unmounts wait on (by mount device), and the operator's --pid-file."""
    held = []
    device = mount_device(mountpoint)
    paths = ([device_pid_file(device)] if device else []) + ([pid_file] if pid_file else [])
    for path in paths:
        try:
            held.append(PidFile(path))
        except OSError as e:
            log.warning("no pid file %s: %s", path, e)
    return held


async def _announce_ready(mountpoint: Path, notify: _Notify) -> None:
    """Ready once the mount answers: a stat of the mount point, served by this very loop."""
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint)
    except OSError as e:
        notify.failed(f"{mountpoint} does not answer: {e.strerror}")
        pyfuse3.terminate()
        return
    notify.ready(mountpoint)
    sdnotify.ready(f"mounted at {mountpoint}")


async def _after_init(ops: Operations, mountpoint: Path) -> None:
    """The kernel sets the mount's read-ahead from FUSE_INIT's reply: raise it after that."""
    await ops.initialized.wait()
    await trio.sleep(0)  # init() runs before libfuse sends the reply
    raise_read_ahead(mountpoint)


def raise_read_ahead(mountpoint: Path) -> None:
    """Page-cached reads come in read-ahead windows, 128 KiB by default: one FUSE request
    each. Raise the mount's window to READ_AHEAD_KB where we may (root), else keep it."""
    dev = mount_device(mountpoint)
    if dev is None:
        return
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        if int(path.read_text()) < READ_AHEAD_KB:
            path.write_text(str(READ_AHEAD_KB))
    except (OSError, ValueError) as e:
        log.debug("read-ahead of %s stays: %s", mountpoint, e)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _setup_logging(path: Path | None, debug: bool, fmt: str | None = None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    env_level = os.environ.get("DFS_LOG_LEVEL")
    if env_level and not debug:
        level = getattr(logging, env_level.upper(), level)
    logs.setup("mount", fmt, level=logging.WARNING, path=path)
    logging.getLogger("fuse_mount").setLevel(level)


def is_mounted(path: Path | str) -> bool:
    """Whether path is a mount point, by the mount table: unlike os.path.ismount this is also
    true for a mount whose process died ("Transport endpoint is not connected")."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4]
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
                if point == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def umount(args: argparse.Namespace) -> int:
    """`dfs umount MOUNTPOINT`: fusermount3 -u (falls back to umount(8) where it is missing),
    then wait until the mount process has committed what it held and exited."""
    mountpoint = os.path.abspath(args.mountpoint)
    if not is_mounted(mountpoint):
        raise DfsError(Code.EINVAL, f"{mountpoint} is not mounted")
    device = mount_device(mountpoint)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    # umount -i: never /sbin/umount.fuse.dfs, which is this very command (mount_helper.py).
    cmd = [tool, "-u"] if tool else ["umount", "-i"]
    if getattr(args, "lazy", False):
        cmd.append("-z" if tool else "-l")
    result = subprocess.run([*cmd, mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise DfsError(Code.EINVAL, why)
    if device and not getattr(args, "lazy", False) and not wait_released(device_pid_file(device)):
        raise DfsError(Code.UNAVAILABLE, f"unmounted, but the mount process is still running "
                                         f"after {EXIT_TIMEOUT:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fuse_mount.main MOUNTPOINT ...`: the mount without the dfs CLI."""
    parser = argparse.ArgumentParser(prog="dfs mount")
    parser.add_argument("--coordinator", default=os.environ.get("DFS_COORDINATOR",
                                                                "127.0.0.1:7700"))
    parser.add_argument("--secret-file", default=os.environ.get("DFS_SECRET_FILE"))
    add_mount_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DfsError as e:
        print(f"dfs: mount: {e.msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
