"""`dfs coordinator` and `dfs node`: the server processes, owned by their own packages.

Their options come from the server packages (`add_coordinator_arguments`,
`add_node_arguments`), imported only when one of these commands runs, so client commands stay
quick to start and work even where a server package is broken or absent. The main parser hands
these commands their arguments unparsed; here they get a full parser of their own.
`dfs node` also holds the admin commands `dfs node list|drain ID|remove ID`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from dfs.cli import admin
from dfs.cli.common import Parser, add_global_options
from dfs.errors import Code, DfsError

SERVERS = {
    "coordinator": ("dfs.coordinator", "add_coordinator_arguments"),
    "node": ("storage_node.main", "add_node_arguments"),
}


def load_module(module: str, *names: str) -> ModuleType | None:
    """`module` if it is there (yet) and has all of `names`, else None."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise
    return mod if all(hasattr(mod, n) for n in names) else None


def load_server(name: str) -> ModuleType | None:
    module, adder = SERVERS[name]
    return load_module(module, adder, "run")


def delegated_parser(
    prog: str, description: str, mod: ModuleType | None, adder: str
) -> Parser:
    """A full parser for a command whose options another package owns (global options too)."""
    parser = Parser(prog=prog, description=description, conflict_handler="resolve")
    add_global_options(parser, suppress=True)
    if mod is not None:
        getattr(mod, adder)(parser)
    return parser


def _server_parser(name: str, mod: ModuleType | None, description: str) -> Parser:
    return delegated_parser(f"dfs {name}", description, mod, SERVERS[name][1])


def _run(name: str, mod: ModuleType | None, args: argparse.Namespace) -> int:
    if mod is None:
        raise DfsError(Code.UNAVAILABLE, f"the {name} server is not available in this install")
    return int(mod.run(args) or 0)


def coordinator(args: argparse.Namespace) -> int:
    mod = load_server("coordinator")
    if mod is None:
        return _run("coordinator", mod, args)
    parser = _server_parser("coordinator", mod, "run the cluster's metadata coordinator")
    parser.parse_args(args.rest, namespace=args)
    return _run("coordinator", mod, args)


def node(args: argparse.Namespace) -> int:
    mod = load_server("node")
    parser = _server_parser(
        "node", mod, "run a storage node, or (with a command) administer the cluster's nodes"
    )
    # `dfs node list` must parse without the server's required options: check those only
    # when a server is what runs.
    required = [a for a in parser._actions if a.required and a.option_strings]
    for action in required:
        action.required = False
    commands = parser.add_subparsers(dest="node_command", metavar="COMMAND")
    admin.add_node_admin(commands)
    parser.parse_args(args.rest, namespace=args)
    if args.node_command is not None:
        return args.func(args)
    missing = [a for a in required if getattr(args, a.dest, None) in (None, a.default)]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(
            "/".join(a.option_strings) for a in missing
        ))
    return _run("node", mod, args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    for name, handler, help in (
        ("coordinator", coordinator, "run the metadata coordinator (see dfs coordinator -h)"),
        ("node", node, "run a storage node, or: dfs node list|drain ID|remove ID"),
    ):
        stub = subparsers.add_parser(name, help=help, add_help=False)
        stub.set_defaults(func=handler, passthrough=True, subject="coordinator")
