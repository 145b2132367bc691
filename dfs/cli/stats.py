"""`dfs stats`: a live view of the cluster, like `juicefs stats` (docs/operations.md, "Metrics").

Every --interval seconds it asks the coordinator for a `stats` sample (its own counters and
what each node's heartbeats reported) and shows the rates between the last two samples:
commits/s, aborts/s, commit latency p50/p99 (from the histogram's buckets), ops/s and MB/s in
and out per node. `--json` prints one sample with its percentiles and exits. Ctrl-C ends the
view cleanly (exit 0); so does --count N after N refreshes.
"""

from __future__ import annotations

import argparse
import signal
from typing import TYPE_CHECKING, Any

from dfs.cli.common import (
    add_json,
    command,
    console,
    print_json,
    seconds_between,
    size_text,
    with_client,
)
from dfs.metrics.rates import cluster_rates, latency_ms

if TYPE_CHECKING:
    from dfs.client import Client

STATE_STYLE = {"up": "green", "down": "red", "draining": "yellow", "removed": "dim"}


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want a positive integer, not {text!r}")
    return int(text)


def one_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The --json document: the sample, its commit latency percentiles since the start."""
    latency = sample.get("commit_latency", {})
    return {**sample, "commit_latency": {**latency, **latency_ms(latency.get("buckets", []))}}


async def stats(client: Client, args: argparse.Namespace) -> int:
    sample = await client.query("stats")
    if args.json:
        print_json(one_sample(sample))
        return 0
    import trio

    out = console()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await _show(client, args, out, sample)
            nursery.cancel_scope.cancel()
    return 0


async def _show(client: Client, args: argparse.Namespace, out: Any,
                first: dict[str, Any]) -> None:
    """Refresh until cancelled (or --count refreshes): a Live table on a terminal, else one
    table per interval, appended (for a log)."""
    import trio
    from rich.live import Live

    old, shown = first, 0
    live = Live(_render(None, first, args.interval), console=out, auto_refresh=False,
                transient=False) if out.is_terminal else None
    try:
        if live is not None:
            live.start(refresh=True)
        while args.count is None or shown < args.count:
            await trio.sleep(args.interval)
            new = await client.query("stats")
            view = _render(cluster_rates(new, old), new, args.interval)
            if live is not None:
                live.update(view, refresh=True)
            else:
                out.print(view)
            old, shown = new, shown + 1
    finally:
        if live is not None:
            live.stop()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _rate(value: float, unit: str = "") -> str:
    if unit == "B":
        return f"{value / 1e6:,.2f}"
    return f"{value:,.1f}"


def _render(rates: dict[str, Any] | None, sample: dict[str, Any], interval: float) -> Any:
    from rich.console import Group
    from rich.table import Table

    r = rates or {}
    summary = Table(title=f"dfs stats (every {interval:g}s; Ctrl-C to end)", box=None,
                    pad_edge=False, title_justify="left")
    columns = ("commits/s", "aborts/s", "commit p50 ms", "commit p99 ms", "coord ops/s",
               "node ops/s", "MB/s in", "MB/s out", "open txns", "gc queue", "repairs",
               "re-repl")
    for c in columns:
        summary.add_column(c, justify="right")
    phases = sample.get("phases", {})
    summary.add_row(
        _rate(r.get("commits_per_s", 0.0)), _rate(r.get("aborts_per_s", 0.0)),
        _ms(r.get("p50_ms")), _ms(r.get("p99_ms")),
        _rate(r.get("coordinator_ops_per_s", 0.0)), _rate(r.get("ops_per_s", 0.0)),
        _rate(r.get("in_bytes_per_s", 0.0), "B"), _rate(r.get("out_bytes_per_s", 0.0), "B"),
        str(sum(phases.values())), str(sample.get("gc_queue", "-")),
        str(sample.get("repair_queue", "-")), str(sample.get("rereplication_queue", "-")),
    )
    nodes = Table(box=None, pad_edge=False)
    for c in ("node", "address", "state", "ops/s", "errors/s", "MB/s in", "MB/s out", "used",
              "capacity"):
        nodes.add_column(c, justify="left" if c in ("address", "state") else "right")
    rated = {n["id"]: n for n in r.get("nodes", [])}
    for n in sample.get("nodes", []):
        nr = rated.get(n["id"], {})
        nodes.add_row(
            str(n["id"]), n["address"], f"[{STATE_STYLE.get(n['state'], '')}]{n['state']}",
            _rate(nr.get("ops_per_s", 0.0)), _rate(nr.get("errors_per_s", 0.0)),
            _rate(nr.get("in_bytes_per_s", 0.0), "B"), _rate(nr.get("out_bytes_per_s", 0.0), "B"),
            size_text(n.get("used")), size_text(n.get("capacity")),
        )
    return Group(summary, "", nodes)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(
        subparsers, "stats", with_client(stats),
        "live cluster figures: commits/s, commit latency p50/p99, ops/s and MB/s per node",
        subject="coordinator",
    )
    p.add_argument("--interval", type=seconds_between(0.1, 3600), default=1.0, metavar="S",
                   help="seconds between refreshes; rates are over this interval (default 1)")
    p.add_argument("--count", type=_count, default=None, metavar="N",
                   help="end after N refreshes (default: until Ctrl-C)")
    add_json(p)
    p.epilog = ("--json prints one sample: the counters since the coordinator started "
                "(commits, aborts by reason, commit latency buckets with p50/p99, RPC totals, "
                "queues, 2PC phases, and per node its reported RPC counters), then exits.")
