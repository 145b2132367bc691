"""Cluster commands: status, node list|drain|remove, txn list (docs/design.md §11)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dfs.cli.common import add_json, command, print_json, show, size_text, with_client
from dfs.cli.lifecycle import describe_rereplication, wait_evacuated
from dfs.errors import Code, DfsError

if TYPE_CHECKING:
    from dfs.client import Client

STATE_STYLE = {"up": "green", "down": "red", "draining": "yellow", "removed": "dim"}
ROLE_TIMEOUT = 2.0  # s: `dfs status` waits this long for each coordinator to say its role
COMPACT_POLL = 0.2  # s between looks at a running compaction's progress


def _nodes_table(nodes: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    right = ("id", "used", "capacity", "live", "on disk")
    for column in ("id", "address", "state", "used", "capacity", "live", "on disk", "last seen"):
        table.add_column(column, justify="right" if column in right else "left")
    for n in sorted(nodes, key=lambda n: n["id"]):
        seen = n.get("last_seen_s")
        table.add_row(
            str(n["id"]),
            n["address"],
            f"[{STATE_STYLE.get(n['state'], '')}]{n['state']}",
            size_text(n.get("used")),
            size_text(n.get("capacity")),
            size_text(n.get("live")),
            size_text(n.get("on_disk")),
            "-" if seen is None else f"{seen:.1f}s ago",
        )
    return table


async def status(client: Client, args: argparse.Namespace) -> int:
    doc = await client.status()
    doc["coordinators"] = await coordinator_roles(client)
    if args.json:
        print_json(doc)
        return 0
    nodes = doc.get("nodes", [])
    up = sum(n["state"] == "up" for n in nodes)
    print(
        f"cluster {doc.get('cluster', '?')}  coordinator {client.address}  "
        f"replicas {doc.get('replicas', '?')}  nodes up {up}/{len(nodes)}"
    )
    print(
        f"in-flight transactions {doc.get('inflight', 0)}  committing {doc.get('committing', 0)}  "
        f"gc pending {doc.get('gc_pending', 0)}  bad replica reports {doc.get('bad_reports', 0)}"
    )
    line = describe_rereplication(doc)
    if line:
        print(line)
    meta = doc.get("meta") or {}
    if meta.get("store") == "etcd":
        print("coordinators: " + ", ".join(f"{c['address']} {c['role']}"
                                           for c in doc["coordinators"]))
        print(describe_etcd(meta))
    if nodes:
        show(_nodes_table(nodes))
    return 0


async def coordinator_roles(client: Client) -> list[dict[str, Any]]:
    """Each coordinator the client was given (and learned), as it answers for itself."""
    import trio

    out: list[dict[str, Any]] = []
    for address in list(client.coordinator.addresses):
        with trio.move_on_after(ROLE_TIMEOUT):
            try:
                info = await client.coordinator.peer(address).call("coordinator_info")
                out.append({"address": address, "role": info.get("role", "?"),
                            "leader": info.get("leader")})
                continue
            except DfsError as e:
                out.append({"address": address, "role": "unreachable", "error": e.msg})
                continue
        out.append({"address": address, "role": "unreachable", "error": "no answer"})
    return out


def describe_etcd(meta: dict[str, Any]) -> str:
    """One line on the etcd the metadata is in: members, the backend's size against the quota."""
    members = []
    for m in meta.get("members", []):
        state = ("leader" if m.get("leader") else "ok") if m.get("healthy") else "DOWN"
        members.append(f"{m.get('endpoint', '?').removeprefix('http://')} {state}")
    line = (f"metadata in etcd: {', '.join(members) or 'no member answers'}; backend "
            f"{size_text(meta.get('db_size'))} of {size_text(meta.get('quota'))} "
            f"({100 * meta.get('quota_used', 0):.0f}%)")
    if meta.get("quota_warning"):
        line += "  WARNING: near etcd's quota (writes stop there; compact and defragment)"
    if meta.get("alarms"):
        line += f"  ALARMS: {', '.join(meta['alarms'])}"
    return line


async def node_list(client: Client, args: argparse.Namespace) -> int:
    nodes = await client.node_list()
    if args.json:
        print_json({"nodes": nodes})
    else:
        show(_nodes_table(nodes))
    return 0


async def node_drain(client: Client, args: argparse.Namespace) -> int:
    await client.node_drain(args.id)
    moved = None if args.no_wait else await wait_evacuated(client, args.id, not args.json)
    if args.json:
        print_json({"id": args.id, "state": "draining", "moved": moved})
    return 0


async def node_remove(client: Client, args: argparse.Namespace) -> int:
    await client.node_remove(args.id)
    moved = None if args.no_wait else await wait_evacuated(client, args.id, not args.json)
    if args.json:
        print_json({"id": args.id, "state": "removed", "moved": moved})
    return 0


async def txn_list(client: Client, args: argparse.Namespace) -> int:
    txns = await client.txn_list()
    if args.json:
        print_json({"txns": txns})
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("txid", "ino", "state", "replicas", "acked", "age"):
        table.add_column(column)
    for t in txns:
        table.add_row(
            str(t["txid"]), str(t.get("ino", "-")), str(t.get("state", "?")),
            ",".join(map(str, t.get("replicas", []))), ",".join(map(str, t.get("acked", []))),
            f"{t.get('age_s', 0):.1f}s",
        )
    show(table)
    return 0


async def compact(client: Client, args: argparse.Namespace) -> int:
    """Ask a node to compact its store online; show its phases, then the figures."""
    import sys

    import trio

    nodes = {n["id"]: n for n in await client.node_list()}
    node = nodes.get(args.id)
    if node is None:
        raise DfsError(Code.ENOENT, f"no node {args.id} (see dfs node list)")
    peer = client.peers[node["address"]]
    job = await peer.call("compact")
    shown = ""
    while not args.no_wait and job.get("running"):
        if not args.json and job.get("phase") != shown:
            shown = job.get("phase", "")
            print(f"node {args.id}: {shown} ({job.get('elapsed_s', 0):.1f} s)", file=sys.stderr,
                  flush=True)
        await trio.sleep(COMPACT_POLL)
        job = (await peer.call("node_info")).get("compaction") or job
    if args.json:
        print_json({"node": args.id, **job})
    elif job.get("running"):
        print(f"node {args.id}: compaction {job.get('id')} started")
    elif job.get("phase") == "done":
        print(f"node {args.id}: compacted {size_text(job.get('before'))} -> "
              f"{size_text(job.get('after'))} on disk (live {size_text(job.get('live'))}) in "
              f"{job.get('elapsed_s', 0):.2f} s; writes paused {job.get('pause_s') or 0:.3f} s, "
              f"{job.get('replayed', 0)} blobs replayed")
    if job.get("phase") == "failed":
        raise DfsError(Code.UNAVAILABLE, f"node {args.id}: compaction failed: {job.get('error')}")
    return 0


def _node_subject(args: argparse.Namespace) -> str:
    return f"node {args.id}"


def add_node_admin(node_commands: argparse._SubParsersAction) -> None:
    """`dfs node list|drain ID|remove ID`, under the `node` command (which also runs a node)."""
    p = command(node_commands, "list", with_client(node_list), "list nodes", subject="coordinator")
    add_json(p)
    for name, handler, what in (
        ("drain", node_drain, "move a node's replicas away; it gets no new ones"),
        ("remove", node_remove, "forget a node for good (its replicas are re-made elsewhere)"),
    ):
        p = command(node_commands, name, with_client(handler), what, subject=_node_subject)
        p.add_argument("id", type=int, metavar="ID", help="node id (see dfs node list)")
        p.add_argument("--no-wait", action="store_true",
                       help="return at once; dfs status shows the re-replication progress")
        add_json(p)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = command(
        subparsers, "status", with_client(status), "nodes, health, space, transactions",
        subject="coordinator",
    )
    add_json(p)
    p = command(subparsers, "compact", with_client(compact),
                "give a node's freed space back to the file system (online)",
                subject=_node_subject)
    p.add_argument("id", type=int, metavar="NODE_ID", help="node id (see dfs node list)")
    p.add_argument("--no-wait", action="store_true", help="return once it has started")
    add_json(p)
    txn = subparsers.add_parser("txn", help="transactions", description="transactions")
    txn_commands = txn.add_subparsers(dest="txn_command", required=True, metavar="COMMAND")
    p = command(
        txn_commands, "list", with_client(txn_list), "in-flight and committing transactions",
        subject="coordinator",
    )
    add_json(p)
    from dfs.cli.atomic import txn_run

    p = command(
        txn_commands, "run", with_client(txn_run),
        "run a JSON list of operations as ONE atomic transaction (all or none)",
        subject="file",
        epilog='FILE (- = stdin) holds e.g. [{"op": "write", "src": "local", "path": "/a", '
               '"if_version": 3}, {"op": "remove", "path": "/b"}, {"op": "rename", "src": '
               '"/c", "dst": "/d"}, {"op": "mkdir", "path": "/e"}]',
    )
    p.add_argument("file", metavar="FILE")
    add_json(p)
