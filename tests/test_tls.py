"""TLS on every link (issue 12): verified both ways, refusals in one line, content unreadable.

In-process servers and clients for the handshake rules and the wire capture; real processes
for a cluster with certificates and for `dfs local up --tls`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from cluster import Cluster

from dfs import rpc, tls_local
from dfs.cli.procs import DFS, Child
from dfs.errors import Code, DfsError
from dfs.tls import TlsConfig

SECRET = b"t" * 40
MARK = b"PLAINTEXT-MARKER-" * 64


class Pki:
    """A cluster CA with a server and a client certificate, and a stranger's CA."""

    def __init__(self, root: Path) -> None:
        hosts = tls_local.local_hosts()
        self.ca = tls_local.make_ca(root / "ca")
        self.server = tls_local.make_cert(root / "ca", "server", hosts)
        self.client = tls_local.make_cert(root / "ca", "client", hosts)
        self.other_ca = tls_local.make_ca(root / "other", "stranger CA")
        self.other = tls_local.make_cert(root / "other", "stranger", hosts)

    def env(self, cert: tuple[Path, Path] | None = None, ca: Path | None = None
            ) -> dict[str, str]:
        cert = cert or self.client
        return {"DFS_TLS_CERT": str(cert[0]), "DFS_TLS_KEY": str(cert[1]),
                "DFS_TLS_CA": str(ca or self.ca)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class Store(rpc.Service):
    def __init__(self) -> None:
        self.stored: list[bytes] = []

    async def op_put(self, req: rpc.Request) -> dict:
        self.stored.append(req.bytes("data"))
        return {"n": len(self.stored)}


async def _serve(nursery: trio.Nursery, tls: TlsConfig | None) -> tuple[Store, str]:
    store = Store()
    listeners = await nursery.start(
        partial(rpc.serve, store, "127.0.0.1", 0, SECRET, lambda: "c1", tls=tls))
    return store, f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_tls_serves_with_both_certificates_verified(nursery: trio.Nursery, pki: Pki
                                                          ) -> None:
    store, address = await _serve(nursery, TlsConfig(pki.ca, *pki.server))
    peer = rpc.Peer(address, SECRET, tls=TlsConfig(pki.ca, *pki.client))
    assert (await peer.call("put", data=b"over tls"))["n"] == 1
    port = address.rsplit(":", 1)[1]  # a DNS name is checked against the DNS SAN
    localhost = rpc.Peer(f"localhost:{port}", SECRET, tls=TlsConfig(pki.ca, *pki.client))
    assert (await localhost.call("put", data=b"by name"))["n"] == 2
    conn = await rpc.connect(address, SECRET, tls=TlsConfig(pki.ca, *pki.client))
    assert conn.frames.mac is None, "TLS already authenticates every byte: no frame MAC"
    await conn.aclose()
    await peer.aclose()
    await localhost.aclose()


@pytest.mark.parametrize("client, why", [
    ("no-cert", "the server requires a client certificate"),
    ("other-ca", "the server refused our certificate (not signed by its --tls-ca)"),
    ("plain", "this server requires TLS"),
    ("distrusts-server", "the server's certificate is not trusted"),
])
async def test_a_client_the_server_cannot_trust_is_refused_in_one_line(
        nursery: trio.Nursery, pki: Pki, client: str, why: str) -> None:
    store, address = await _serve(nursery, TlsConfig(pki.ca, *pki.server))
    tls = {"no-cert": TlsConfig(pki.ca), "other-ca": TlsConfig(pki.ca, *pki.other),
           "plain": None, "distrusts-server": TlsConfig(pki.other_ca, *pki.client)}[client]
    with pytest.raises(DfsError) as e:
        await rpc.Peer(address, SECRET, tls=tls, timeout=5).call("put", data=b"x")
    assert e.value.code is Code.AUTH and why in e.value.msg and "\n" not in e.value.msg
    assert store.stored == []


async def test_a_tls_client_of_a_plain_server_is_told_so(nursery: trio.Nursery, pki: Pki
                                                         ) -> None:
    _, address = await _serve(nursery, None)
    with pytest.raises(DfsError) as e:
        await rpc.Peer(address, SECRET, tls=TlsConfig(pki.ca, *pki.client)).call("put", data=b"")
    assert e.value.code is Code.AUTH and "does not speak TLS" in e.value.msg


async def test_a_certificate_for_another_host_is_refused(nursery: trio.Nursery, tmp_path: Path,
                                                         pki: Pki) -> None:
    """check_hostname: the host of the address dialled must be in the server's SANs."""
    other_host = tls_local.make_cert(pki.ca.parent, "elsewhere", ["10.9.8.7"])
    _, address = await _serve(nursery, TlsConfig(pki.ca, *other_host))
    with pytest.raises(DfsError) as e:
        await rpc.Peer(address, SECRET, tls=TlsConfig(pki.ca, *pki.client)).call("put", data=b"")
    assert e.value.code is Code.AUTH and "127.0.0.1" in e.value.msg


class CaptureProxy:
    """Forwards bytes both ways and keeps a copy of everything it carried."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.captured = bytearray()

    async def handle(self, client: trio.SocketStream) -> None:
        host, port = rpc.parse_address(self.target)
        async with client, await trio.open_tcp_stream(host, port) as server, \
                trio.open_nursery() as nursery:
            for source, sink in ((client, server), (server, client)):
                nursery.start_soon(self._pump, source, sink, nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                self.captured += data
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()


@pytest.mark.parametrize("tls", [False, True])
async def test_content_is_unreadable_on_the_wire_only_with_tls(
        nursery: trio.Nursery, pki: Pki, tls: bool) -> None:
    """The frame MAC protects integrity, not secrecy: without TLS the bytes are in the clear."""
    _, address = await _serve(nursery, TlsConfig(pki.ca, *pki.server) if tls else None)
    proxy = CaptureProxy(address)
    listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    proxied = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    peer = rpc.Peer(proxied, SECRET, tls=TlsConfig(pki.ca, *pki.client) if tls else None)
    assert (await peer.call("put", data=MARK))["n"] == 1
    assert (await peer.call("put", data=MARK * 200))["n"] == 2  # a bulk frame too
    await peer.aclose()
    assert len(proxy.captured) > 200 * len(MARK)
    assert (b"PLAINTEXT-MARKER" in proxy.captured) is not tls


# ---------------------------------------------------------------- real processes


class TlsCluster(Cluster):
    """Every process and every `dfs` command run with the cluster's certificates."""

    def __init__(self, root: Path, pki: Pki, **options: object) -> None:
        env = pki.env(pki.server)
        names = ["coordinator", *[f"node-{i}" for i in range(1, 4)]]
        super().__init__(root, env={n: env for n in names}, **options)  # type: ignore[arg-type]
        self.tls_env = pki.env()

    def cli_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:  # type: ignore[override]
        return super().cli_env({**self.tls_env, **(extra or {})})


def _one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_cluster_with_certificates_serves_put_and_get_and_refuses_strangers(
        tmp_path: Path, pki: Pki) -> None:
    cluster = TlsCluster(tmp_path / "c", pki, nodes=2, replicas=2)
    try:
        cluster.start()
        data = os.urandom(3 * 1024 * 1024 + 17)
        assert cluster.dfs("put", "-", "/f", input=data).returncode == 0
        assert cluster.dfs("cat", "/f").stdout == data
        no_cert = {"DFS_TLS_CERT": "", "DFS_TLS_KEY": ""}
        err = _one_line(cluster.dfs("cat", "/f", env=no_cert))
        assert "TLS: the server requires a client certificate" in err, err
        err = _one_line(cluster.dfs("cat", "/f", env=pki.env(pki.other)))
        assert "TLS: the server refused our certificate" in err, err
        err = _one_line(cluster.dfs("cat", "/f", env={"DFS_TLS_CERT": "", "DFS_TLS_KEY": "",
                                                      "DFS_TLS_CA": ""}))
        assert "this server requires TLS" in err, err
    finally:
        cluster.stop_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_up_tls_works_end_to_end(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    up = Child("local-up", [*DFS, "--coordinator", address, "local", "up", "--tls", "--dir",
                            str(tmp_path / "c"), "--nodes", "2", "--replicas", "2"],
               tmp_path / "up.log")
    up.start()
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops" not in up.log.read_bytes():
            assert up.running(), up.log_tail()
            assert time.monotonic() < deadline, up.log_tail()
            time.sleep(0.1)
        exports = re.search(r"export (.*)", up.log.read_text())
        assert exports, up.log_tail()
        env = {**os.environ, **dict(kv.split("=", 1) for kv in exports.group(1).split())}
        assert env["DFS_TLS_CA"].endswith("ca.crt")
        run = partial(subprocess.run, capture_output=True, timeout=60, env=env)
        assert run([*DFS, "put", "-", "/hello"], input=b"over tls").returncode == 0
        assert run([*DFS, "cat", "/hello"]).stdout == b"over tls"
        plain = {k: v for k, v in env.items() if not k.startswith("DFS_TLS_")}
        refused = run([*DFS, "cat", "/hello"], env=plain)
        assert refused.returncode == 1 and b"requires TLS" in refused.stderr
    finally:
        assert up.stop(timeout=30) == 0, up.log_tail()


def test_bad_tls_files_are_one_line_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    result = subprocess.run([*DFS, "--tls-ca", str(missing), "status"], capture_output=True,
                            timeout=30)
    err = _one_line(result)
    assert f"cannot load --tls-ca {missing}" in err, err


def test_the_mount_helper_passes_the_tls_options() -> None:
    from dfs.cli.mount_helper import translate

    argv = translate("127.0.0.1:7700", "/mnt/x", "tls_cert=/c.crt,tls_key=/c.key,tls_ca=/ca.crt")
    joined = " ".join(argv)
    assert "--tls-cert /c.crt" in joined and "--tls-key /c.key" in joined
    assert "--tls-ca /ca.crt" in joined
