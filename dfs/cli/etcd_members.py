"""Local etcd members for `dfs local up --ha` (and the tests): N `etcd` processes on loopback.

Ports are picked once, by binding port 0, and kept in DIR/etcd/members.json: a member's peer
URL is part of the cluster's stored membership, so a restarted `dfs local up --ha` must bring
each member back on the same ports. Compaction and the backend quota are set here, not left to
etcd's defaults (docs/coordinator.md, "Metadata on etcd").
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dfs.cli.procs import Child
from dfs.errors import Code, DfsError

#: Keep the last this many revisions; older ones are compacted by etcd itself.
COMPACTION_RETENTION = "10000"
#: etcd refuses writes (NOSPACE alarm) past this backend size; `dfs status` warns before.
QUOTA_BYTES = 2 * 1024**3
#: Lowered from etcd's 100 ms / 1000 ms so a lost member is noticed quickly on loopback.
HEARTBEAT_MS = 100
ELECTION_MS = 1000
READY_TIMEOUT = 30.0


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise DfsError(Code.UNAVAILABLE, "etcd is not installed (scripts/install puts "
                                         "Debian's etcd-server in)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass(frozen=True)
class MemberTls:
    """TLS on a member's client and peer links: its certificate (with loopback SANs) and the
    CA that signs the coordinators' and the other members' (both sides verified)."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        files = ["--cert-file", str(self.cert), "--key-file", str(self.key),
                 "--trusted-ca-file", str(self.ca), "--client-cert-auth"]
        peer = ["--peer-cert-file", str(self.cert), "--peer-key-file", str(self.key),
                "--peer-trusted-ca-file", str(self.ca), "--peer-client-cert-auth"]
        return files + peer

    def context(self) -> ssl.SSLContext:
        """A client context for health checks: the CA, and this certificate to present."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class LocalEtcd:
    """`count` members under root/etcd/, their ports kept across restarts."""

    def __init__(self, root: Path, count: int = 3, *, token: str = "dfs-local",
                 tls: Callable[[str], MemberTls] | None = None) -> None:
        """`tls`: a member's name -> its TLS files (`dfs local up --ha --tls`); None: plain."""
        self.root = Path(root) / "etcd"
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.members = self._members(count)
        self.tls = {m.name: tls(m.name) for m in self.members} if tls is not None else None
        self.children = [
            Child(m.name, self.command(m), self.root / f"{m.name}.log", die_with_parent=True)
            for m in self.members
        ]

    def _members(self, count: int) -> list[Member]:
        state = self.root / "members.json"
        if state.exists():
            members = [Member(**m) for m in json.loads(state.read_text())]
            if len(members) != count:
                raise DfsError(Code.EINVAL, f"{self.root} holds {len(members)} etcd members, "
                                            f"not {count}")
            return members
        members = [Member(f"etcd-{i}", free_port(), free_port()) for i in range(1, count + 1)]
        state.write_text(json.dumps([m.__dict__ for m in members]))
        return members

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The coordinator's --meta value."""
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)

    def command(self, m: Member) -> list[str]:
        return member_command(etcd_binary(), m, self.members, self.root / f"{m.name}.data",
                              token=self.token, tls=self.tls[m.name] if self.tls else None)

    def start(self) -> None:
        for child in self.children:
            child.start()
        deadline = time.monotonic() + READY_TIMEOUT
        for member, child in zip(self.members, self.children, strict=True):
            tls = self.tls[member.name] if self.tls else None
            while not healthy(member.endpoint, tls=tls):
                status = child.poll()
                if status is not None:
                    raise DfsError(Code.UNAVAILABLE, f"etcd member {member.name} exited with "
                                                     f"status {status}: {child.log_tail(3)}")
                if time.monotonic() > deadline:
                    raise DfsError(Code.UNAVAILABLE, f"etcd member {member.name} is not "
                                                     f"healthy after {READY_TIMEOUT:.0f}s")
                time.sleep(0.1)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def member_command(binary: str, m: Member, members: Sequence[Member], data: Path, *,
                   token: str, retention: str = COMPACTION_RETENTION,
                   quota: int = QUOTA_BYTES, tls: MemberTls | None = None) -> list[str]:
    """The etcd command line of member m of `members` (all on loopback; with `tls` every
    member's client and peer URLs are https and both sides of each link are verified)."""
    scheme = "https" if tls is not None else "http"

    def peer(o: Member) -> str:
        return o.peer_url.replace("http://", f"{scheme}://", 1)

    cluster = ",".join(f"{o.name}={peer(o)}" for o in members)
    return [
        binary, "--name", m.name, "--data-dir", str(data),
        "--listen-client-urls", f"{scheme}://{m.endpoint}",
        "--advertise-client-urls", f"{scheme}://{m.endpoint}",
        "--listen-peer-urls", peer(m), "--initial-advertise-peer-urls", peer(m),
        *(tls.flags() if tls is not None else []),
        "--initial-cluster", cluster, "--initial-cluster-token", token,
        "--initial-cluster-state", "new",
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", retention,
        "--quota-backend-bytes", str(quota),
        "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
        "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
    ]


def healthy(endpoint: str, timeout: float = 1.0, *, tls: MemberTls | None = None) -> bool:
    """etcd's own /health: true once the member is in a cluster with a leader."""
    scheme = "https" if tls is not None else "http"
    context = tls.context() if tls is not None else None
    try:
        with urllib.request.urlopen(f"{scheme}://{endpoint}/health", timeout=timeout,
                                    context=context) as reply:
            return bool(json.loads(reply.read()).get("health") == "true")
    except (OSError, urllib.error.URLError, ValueError):
        return False
