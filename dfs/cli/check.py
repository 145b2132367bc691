"""`dfs check [PATH] [--deep] [--repair] [--json]`: the replica consistency checker.

Exit status (docs/design.md §11): 0 clean (with --repair: everything found was fixed), 3 problems
found (and, with --repair, not all fixed), 1 the check itself failed. A progress bar on a
terminal's stderr; a summary on stdout; with --json one document with a record per finding.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dfs.cli.common import (
    add_json,
    cluster_path,
    command,
    console,
    print_json,
    show,
    size_text,
    with_client,
)

if TYPE_CHECKING:
    from dfs.checker import Report
    from dfs.client import Client

EXIT_PROBLEMS = 3
ROWS_SHOWN = 50
PHASES = {"metadata": "reading metadata", "nodes": "listing node blobs",
          "verify": "re-hashing replicas", "repair": "repairing"}


@contextmanager
def phase_progress(enabled: bool) -> Iterator[Callable[[str, int, int | None], None]]:
    """One rich bar per phase on stderr when it is a terminal; else a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda phase, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def _summary_table(report: Report) -> Any:
    from rich.table import Table

    from dfs.checker.findings import LABELS, Kind

    table = Table(box=None, pad_edge=False, title=None)
    table.add_column("problem")
    table.add_column("count", justify="right")
    if report.repair:
        table.add_column("fixed", justify="right")
    for kind, (n, fixed) in sorted(report.counts.items(), key=lambda kc: list(Kind).index(kc[0])):
        row = [LABELS[kind], str(n)] + ([str(fixed)] if report.repair else [])
        table.add_row(*row)
    return table


def _findings_table(report: Report) -> Any:
    from rich.table import Table

    from dfs.checker.findings import LABELS

    table = Table(box=None, pad_edge=False)
    for column in ("problem", "file", "node", "detail", *(("repair",) if report.repair else ())):
        table.add_column(column)
    for f in report.findings[:ROWS_SHOWN]:
        where = f.path or (f"ino {f.ino}" if f.ino is not None else f"blob {f.blob}")
        row = [LABELS[f.kind], where, "-" if f.node is None else str(f.node), f.detail]
        if report.repair:
            mark = "[green]fixed[/]" if f.fixed else "[red]not fixed[/]"
            row.append(f"{mark}: {f.fix}")
        table.add_row(*row)
    return table


def print_report(report: Report) -> None:
    verified = f", {size_text(report.verified_bytes)} re-hashed" if report.deep else ""
    listed = sum(1 for n in report.nodes if n["listed"])
    print(f"checked {report.files} files ({report.replicas} replicas, R={report.r}) on "
          f"{listed}/{len(report.nodes)} nodes in {report.elapsed_s:.2f} s{verified}")
    for node in report.nodes:
        if not node["listed"] and node["state"] != "removed":
            print(f"node {node['id']} ({node['address']}) is {node['state']}"
                  + (f": {node['note']}" if node["note"] else ""))
    for note in report.notes:
        print(f"note: {note}")
    if report.clean:
        print("no problems found")
        return
    show(_summary_table(report))
    print()
    show(_findings_table(report))
    if report.total > ROWS_SHOWN:
        print(f"... and {report.total - min(ROWS_SHOWN, len(report.findings))} more "
              f"(--json lists up to {len(report.findings)})")
    if report.repair:
        print("all fixed" if not report.unfixed else f"{report.unfixed} not fixed")


async def check(client: Client, args: argparse.Namespace) -> int:
    from dfs.checker import run_check

    path = cluster_path(args.path)
    with phase_progress(not args.json) as progress:
        report = await run_check(client, path=path, deep=args.deep, repair=args.repair,
                                 progress=progress, page=args.page_size)
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report)
    return 0 if report.ok else EXIT_PROBLEMS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(subparsers, "check", with_client(check),
                "check every replica against the metadata (and repair)", subject="coordinator")
    p.add_argument("path", nargs="?", default="/", metavar="PATH",
                   help="check only files under PATH (default: everything)")
    p.add_argument("--deep", action="store_true",
                   help="have every node re-read and re-hash its copies")
    p.add_argument("--repair", action="store_true",
                   help="fix what is found (each fix a transaction); exit 0 only if all fixed")
    # Tests: a tiny page makes every walk cross many page boundaries (docs/checker.md).
    p.add_argument("--page-size", type=int, default=None, help=argparse.SUPPRESS)
    add_json(p)
