"""TLS for every dfs link (docs/operations.md "TLS"): stdlib `ssl` contexts under trio.SSLStream.

Both ends are verified: a server requires a client certificate signed by the cluster's CA
(`CERT_REQUIRED`), and a client checks the server's certificate against the CA and the host
of the address it dialled (`check_hostname`; 127.0.0.1 needs an IP SAN). The cluster secret's
handshake (dfs/rpc.py) still runs inside TLS. A process's settings come from
`--tls-cert/--tls-key/--tls-ca` and are installed once (`install`), like its secret; `dfs
local up --tls` makes a throwaway CA for them (dfs/tls_local.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from pathlib import Path

import trio

from dfs.errors import Code, DfsError
from dfs.wire import encode

log = logging.getLogger(__name__)

_TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS ClientHello


class TlsConfig:
    """One process's certificate, key and CA, loaded into its two contexts at once (a bad
    file is a one-line error at start, never at the first connection)."""

    def __init__(self, ca: str | Path, cert: str | Path | None = None,
                 key: str | Path | None = None) -> None:
        if (cert is None) != (key is None):
            raise DfsError(Code.EINVAL, "--tls-cert and --tls-key go together")
        self.ca, self.cert, self.key = Path(ca), cert and Path(cert), key and Path(key)
        self.client = self._context(ssl.Purpose.SERVER_AUTH)
        self.server = self._context(ssl.Purpose.CLIENT_AUTH) if cert is not None else None

    @property
    def can_serve(self) -> bool:
        return self.server is not None

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(purpose, cafile=str(self.ca))
        except (OSError, ssl.SSLError) as e:
            raise DfsError(Code.EINVAL, f"cannot load --tls-ca {self.ca}: {_why(e)}") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except (OSError, ssl.SSLError) as e:
                raise DfsError(Code.EINVAL, f"cannot load --tls-cert {self.cert} / --tls-key "
                                            f"{self.key}: {_why(e)}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED  # both ends: a server asks for the client's
        if purpose is ssl.Purpose.CLIENT_AUTH:
            ctx.num_tickets = 0  # no resumption: nothing unasked-for arrives on an idle link
        else:
            ctx.check_hostname = True
        return ctx


def _why(e: BaseException) -> str:
    return (getattr(e, "verify_message", None) or getattr(e, "reason", None)
            or getattr(e, "strerror", None) or str(e) or type(e).__name__)


_installed: TlsConfig | None = None


def install(config: TlsConfig | None) -> None:
    """This process's TLS settings for every later `serve`, `connect` and `Peer` (None: none)."""
    global _installed
    _installed = config


def current() -> TlsConfig | None:
    return _installed


def from_options(cert: str | None, key: str | None, ca: str | None) -> TlsConfig | None:
    """The settings the three options give (None when none is given)."""
    if not (cert or key or ca):
        return None
    if not ca:
        raise DfsError(Code.EINVAL, "--tls-cert/--tls-key need --tls-ca (the cluster's CA)")
    return TlsConfig(ca, cert or None, key or None)


# ---------------------------------------------------------------- streams


async def accept(stream: trio.SocketStream, config: TlsConfig, peer: str
                 ) -> trio.SSLStream[trio.SocketStream] | None:
    """The server's side of a new connection: TLS with a verified client, or None (closed).

    A client speaking plain dfs (its first byte is not a TLS handshake record) is told so in
    one plain error frame, so its user reads why instead of a bare reset."""
    assert config.server is not None
    first = await stream.socket.recv(1, socket.MSG_PEEK)
    if not first:
        return None
    if first[0] != _TLS_RECORD_HANDSHAKE:
        await stream.send_all(encode(DfsError(
            Code.AUTH, "this server requires TLS: give --tls-cert, --tls-key and --tls-ca"
        ).to_reply()))
        return None
    secured = trio.SSLStream(stream, config.server, server_side=True)
    try:
        await secured.do_handshake()
    except trio.BrokenResourceError as e:
        log.warning("TLS handshake from %s failed: %s", peer, _why(e.__cause__ or e))
        await _send_alert(secured, stream)
        return None
    return secured


async def _send_alert(secured: trio.SSLStream[trio.SocketStream],
                      stream: trio.SocketStream) -> None:
    """Send the alert OpenSSL wrote for a failed handshake (trio drops it when it marks the
    stream broken), so the client can say which certificate was refused rather than "closed".
    Best effort: `_outgoing` is trio's memory BIO, read only here."""
    pending = getattr(secured, "_outgoing", None)
    data = pending.read() if pending is not None else b""
    if data:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(data)


def wrap_client(stream: trio.SocketStream, config: TlsConfig, host: str
                ) -> trio.SSLStream[trio.SocketStream]:
    """A client stream to `host`; its handshake runs at the first frame sent."""
    return trio.SSLStream(stream, config.client, server_hostname=host)


def refusal(error: BaseException, address: str) -> DfsError | None:
    """The one-line AUTH error for a TLS failure of a connection to `address`, else None
    (a reset or EOF without a TLS alert stays a network error: the peer may be restarting)."""
    cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else None
    if isinstance(cause, ssl.SSLCertVerificationError):
        return DfsError(Code.AUTH, f"{address}: TLS: the server's certificate is not "
                                   f"trusted: {cause.verify_message}")
    if not isinstance(cause, ssl.SSLError) or isinstance(cause, ssl.SSLEOFError):
        return None
    reason = (cause.reason or "").upper()
    if "CERTIFICATE_REQUIRED" in reason:
        why = "the server requires a client certificate (--tls-cert, --tls-key)"
    elif "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" \
            in reason or "DECRYPT_ERROR" in reason:
        why = "the server refused our certificate (not signed by its --tls-ca)"
    elif "WRONG_VERSION" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
        why = "the server does not speak TLS"
    else:
        why = (cause.reason or str(cause)).lower().replace("_", " ")
    return DfsError(Code.AUTH, f"{address}: TLS: {why}")

