"""etcd's watch over the JSON gateway, on trio: every change to a key range, in revision order.

A warm standby (dfs/etcd/follower.py) follows the metadata with it. The gateway's `/v3/watch`
takes one create request and streams newline-delimited JSON: a "created" reply, then a reply
per batch of events (historical ones first when `start_revision` is in the past). Events come
in revision order and every event of one revision comes before any of the next, so after an
event of revision N nothing older is still on its way.

Unlike dfs/etcd/client.py this runs on the trio thread (httpx's async client, whose transport
runs on trio through anyio): a watch waits most of its life, and a cancel scope ends it at
once, where a worker thread blocked in a read could not be stopped.

A stream silent for `idle` seconds is dropped and the caller watches again from where it was:
a member that accepts and never answers (paused, partitioned) must not hold a standby back
for longer than that.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from dfs.etcd.client import Compacted, EtcdError, b64, unb64

WATCH_IDLE = 2.0  # seconds without a byte before a stream is taken for dead and dropped
CONNECT_TIMEOUT = 1.0  # per endpoint
MAX_LINE = 64 * 1024 * 1024  # one reply line: a batch of events (etcd caps a request at 1.5 MiB)


@dataclass(frozen=True, slots=True)
class Event:
    """One change: `value` None is a delete."""

    key: bytes
    value: bytes | None
    revision: int


class Idle(EtcdError):
    """The stream said nothing for WATCH_IDLE seconds (nothing changed, or the member is gone)."""


async def watch(endpoints: Sequence[str], key: bytes, range_end: bytes, start_revision: int,
                apply: Callable[[list[Event]], Awaitable[None]], *,
                idle: float = WATCH_IDLE, tls: ssl.SSLContext | None = None) -> None:
    """Pass each batch of events on [key, range_end) from start_revision on to `apply`,
    trying one endpoint after the other until one answers. Ends only by raising: Compacted
    (start_revision is gone: load again), Idle, or EtcdError (the stream broke); the caller
    watches again from the revision after the last event it applied. (A callback, not an
    async generator: trio forbids yielding from inside the stream's context.)"""
    body = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                               "start_revision": str(start_revision)}}
    timeout = httpx.Timeout(CONNECT_TIMEOUT, read=idle)
    last = "no endpoint tried"
    scheme = "https" if tls is not None else "http"
    async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                 verify=tls if tls is not None else True) as http:
        for base in endpoints:
            base = base if "://" in base else f"{scheme}://{base}"
            try:
                async with http.stream("POST", base + "/v3/watch", json=body) as reply:
                    if reply.status_code != 200:
                        last = f"{base}: HTTP {reply.status_code} on /v3/watch"
                        continue
                    async for line in reply.aiter_lines():
                        events = _events(base, line)
                        if events:
                            await apply(events)
                    last = f"{base} ended the watch stream"
            except httpx.ReadTimeout:
                raise Idle(f"etcd at {base}: no watch reply in {idle} s") from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = f"{base}: cannot connect ({e or type(e).__name__})"
                continue
            except httpx.HTTPError as e:
                raise EtcdError(f"etcd at {base}: the watch broke ({e or type(e).__name__})"
                                ) from None
            raise EtcdError(f"etcd at {last}")
    raise EtcdError(f"etcd unreachable for a watch: {last}")


def _events(base: str, line: str) -> list[Event]:
    """One reply line's events; raises on a cancel (a compaction) or an error reply."""
    if not line.strip():
        return []
    if len(line) > MAX_LINE:
        raise EtcdError(f"etcd at {base}: a watch reply of {len(line)} bytes")
    try:
        reply = json.loads(line)
    except ValueError:
        raise EtcdError(f"etcd at {base}: a watch reply that is not JSON") from None
    if "error" in reply:
        error = reply["error"]
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        raise EtcdError(f"etcd at {base}: watch: {message}")
    result = reply.get("result", {})
    if result.get("canceled"):
        compacted = int(result.get("compact_revision", 0) or 0)
        if compacted:
            raise Compacted(f"etcd compacted to revision {compacted} under a watch")
        raise EtcdError(f"etcd at {base} cancelled the watch: "
                        f"{result.get('cancel_reason', 'no reason given')}")
    events = []
    for event in result.get("events", []):
        kv = event.get("kv", {})
        value = None if event.get("type") == "DELETE" else unb64(kv.get("value"))
        events.append(Event(unb64(kv.get("key")), value, int(kv.get("mod_revision", 0))))
    return events
