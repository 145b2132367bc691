"""`--metrics HOST:PORT`: the process's registry over HTTP, served by a trio task.

Not `prometheus_client.start_http_server`: that runs the collectors on its own thread, where
reading the server's state (trio objects, the in-memory 2PC machine) would race the trio
thread. Here a scrape is answered on the trio thread by `generate_latest(registry)`; the
responder is a minimal HTTP/1.0 one (one request per connection, then close), enough for
Prometheus, curl and httpx. Every connection has a read limit, a timeout and a slot among
MAX_CONNECTIONS: a stuck or hostile client cannot grow the process.
"""

from __future__ import annotations

import argparse
import logging

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest

from dfs.cli.common import listen_address
from dfs.errors import Code, DfsError
from dfs.rpc import join_address, parse_address

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192  # a request head longer than this is refused (431)
REQUEST_TIMEOUT = 5.0  # s to send the request head, then the connection is dropped
MAX_CONNECTIONS = 16  # scrapes served at once; more are answered 503 at once
PATHS = (b"/metrics", b"/")


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics", type=listen_address, default=None, metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (port 0: the OS "
             "picks; the address is printed as 'metrics on HOST:PORT'). Default: off")


async def start_metrics(nursery: trio.Nursery, registry: CollectorRegistry,
                        address: str | None, process: str) -> str | None:
    """--metrics: serve `registry` in `nursery` (it dies with the process); the bound address
    is printed as "dfs PROCESS metrics on HOST:PORT", before the process's 'listening' line,
    so whoever waits for that one finds it. None: --metrics not given."""
    if address is None:
        return None
    bound: str = await nursery.start(serve_metrics, registry, address)
    print(f"dfs {process} metrics on {bound}", flush=True)
    return bound


async def bind_metrics(address: str) -> tuple[list[trio.SocketListener], str]:
    """The listeners for --metrics and the HOST:PORT bound (port 0: the one the OS picked).
    A port that cannot be bound is DfsError EINVAL (one line for the operator)."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise DfsError(Code.EINVAL,
                       f"cannot serve metrics on {address}: {e.strerror or e}") from None
    bound = join_address(*listeners[0].socket.getsockname()[:2])
    log.info("metrics on %s", bound)
    return listeners, bound


async def serve_metrics(
    registry: CollectorRegistry, address: str, *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` at `address` until cancelled; task_status.started() gets the bound
    HOST:PORT."""
    listeners, bound = await bind_metrics(address)
    task_status.started(bound)
    await serve_metrics_on(registry, listeners)


async def serve_metrics_on(registry: CollectorRegistry,
                           listeners: list[trio.SocketListener]) -> None:
    """Answer scrapes on listeners already bound (`bind_metrics`) until cancelled."""
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await _reply(stream, b"503 Service Unavailable", b"too many scrapes at once\n")
            return
        try:
            await _serve_one(stream, registry)
        finally:
            slots.release()

    await trio.serve_listeners(handle, listeners)


async def _serve_one(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    head = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                if len(head) > MAX_REQUEST_BYTES:
                    await _reply(stream, b"431 Request Header Fields Too Large", b"")
                    return
                data = await stream.receive_some(4096)
                if not data:
                    break
                head += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        await _reply(stream, b"400 Bad Request", b"")
        return
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        await _reply(stream, b"405 Method Not Allowed", b"")
        return
    if target not in PATHS:
        await _reply(stream, b"404 Not Found", b"see /metrics\n")
        return
    try:
        body = generate_latest(registry)
    except Exception:  # a collector's bug: the scrape fails, the process does not
        log.exception("metrics collection failed")
        await _reply(stream, b"500 Internal Server Error", b"see the process's log\n")
        return
    await _reply(stream, b"200 OK", body, content_type=CONTENT_TYPE_LATEST.encode(),
                 send_body=method == b"GET")


async def _reply(stream: trio.SocketStream, status: bytes, body: bytes, *,
                 content_type: bytes = b"text/plain; charset=utf-8",
                 send_body: bool = True) -> None:
    head = (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(head + body if send_body else head)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()
