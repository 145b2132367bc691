"""`dfs bench`: measure a cluster through the client library, and a mount beside another
directory (local disk, or a peer file system's mount such as GlusterFS) in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfs.bench import Measure
from dfs.cli.common import add_json, command, console, print_json, show, with_client


@contextmanager
def _steps(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over the benchmark's steps on stderr, when it is a terminal."""
    err = console(stderr=True)
    if not (enabled and err.is_terminal):
        yield lambda name: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("bench", total=total)
        first = True

        def step(name: str) -> None:
            nonlocal first
            if not first:
                progress.advance(task)
            first = False
            progress.update(task, description=name)

        yield step


def _table(title: str, rows: list[Measure], baseline: list[Measure] | None,
           baseline_name: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("dfs", justify="right")
    if baseline is not None:
        table.add_column(baseline_name, justify="right")
        table.add_column("dfs / it", justify="right")
    table.add_column("p50 / p99", justify="right")
    for i, m in enumerate(rows):
        cells = [m.name, f"{m.rate:,.1f} {m.unit}"]
        if baseline is not None:
            b = baseline[i]
            cells += [f"{b.rate:,.1f} {b.unit}", f"{m.rate / b.rate:.2f}x" if b.rate else "-"]
        lat = m.extra
        cells.append(f"{lat['p50_ms']} / {lat['p99_ms']} ms" if "p50_ms" in lat else "")
        table.add_row(*cells)
    return table


async def bench(client: Any, args: argparse.Namespace) -> int:
    import trio

    from dfs.bench import fs, library

    doc: dict[str, Any] = {}
    steps = 4 + (12 if args.mount else 0)
    with _steps(steps, not args.json) as step:
        lib = await library.run(client, size_mib=args.size_mib, small=args.small, step=step)
        doc["library"] = [m.to_json() for m in lib]
        mount = compare = None
        if args.mount:
            options = {"size_mib": args.size_mib, "files": args.files,
                       "listing": args.listing, "tar_files": args.tar_files, "step": step}
            mount = await trio.to_thread.run_sync(lambda: fs.run(args.mount, **options))
            doc["mount"] = [m.to_json() for m in mount]
            if args.compare:
                compare = await trio.to_thread.run_sync(lambda: fs.run(args.compare, **options))
                doc["compare"] = {"dir": str(args.compare),
                                  "results": [m.to_json() for m in compare]}
                doc["ratio"] = {m.name: round(m.rate / c.rate, 3)
                                for m, c in zip(mount, compare, strict=True) if c.rate}
    if args.json:
        print_json(doc)
        return 0
    show(_table("through the client library (R from the cluster)", lib, None))
    if mount is not None:
        show(_table(f"through the mount at {args.mount}", mount, compare, str(args.compare)))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "bench", with_client(bench),
                "measure the cluster (client library) and, with --mount, a mount",
                subject="coordinator")
    p.add_argument("--mount", type=Path, metavar="DIR", help="also measure through this mount")
    p.add_argument("--compare", type=Path, metavar="DIR",
                   help="with --mount: run the same file benchmarks in DIR too, in the same run "
                        "(a local-disk dir, or a GlusterFS or MooseFS mount), and show ratios")
    p.add_argument("--size-mib", type=int, default=256, help="big file size (default 256)")
    p.add_argument("--small", type=int, default=2000, help="4 KiB commits per writer count")
    p.add_argument("--files", type=int, default=1000, help="small files through the mount")
    p.add_argument("--listing", type=int, default=10_000, help="entries for ls -l")
    p.add_argument("--tar-files", type=int, default=2000, help="files in the tar to extract")
    add_json(p)
