"""`dfs coordinator` options (docs/design.md §11, docs/protocol.md timing defaults)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dfs.cli.common import env_default, etcd_url, listen_address
from dfs.metrics.http import add_metrics_argument
from dfs.rpc import parse_address
from dfs.unwritten import UNWRITTEN_LEASE_S

DEFAULT_LISTEN = "127.0.0.1:7700"


@dataclass
class CoordinatorConfig:
    """Every knob of a coordinator; tests shorten the timeouts."""

    data: Path
    listen: str = DEFAULT_LISTEN
    replicas: int = 3  # used at first start only; then the stored R wins
    node_timeout: float = 3.0  # no heartbeat this long: the node is down
    vote_timeout: float = 5.0  # a PREPARE not answered this long is a NO
    gc_grace: float = 60.0  # a superseded blob lives this long for readers still on it
    txn_timeout: float = 120.0  # an open transaction whose client went silent is aborted
    commit_retry_interval: float = 1.0  # re-send owed COMMITs this often
    gc_interval: float = 1.0  # look for due GC entries this often
    txn_retention: float = 60.0  # keep ENDED records this long, then purge
    rpc_timeout: float = 10.0  # COMMIT, ABORT, delete calls to nodes; x3 for a repair fetch
    txid_block: int = 1024  # txids leased per forced write
    rereplicate_after: float = 600.0  # a node down this long has its replicas re-made elsewhere
    meta: str | None = None  # etcd://HOST:PORT[,...]: metadata in etcd, standbys (ha.py)
    leader_ttl: int = 2  # seconds of the leader's etcd lease: a standby takes over after it
    etcd_quota: int = 2 * 1024**3  # etcd's --quota-backend-bytes (its default): status warns
    keep_versions: int = 0  # old versions a file keeps unless a directory says otherwise
    snapshot_piece: int = 4_000  # keys a snapshot writes per group commit (SNAPSHOT_PIECE)
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics at (dfs/metrics)
    unwritten_lease: float = UNWRITTEN_LEASE_S  # an unwritten file nobody renews is given up

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.listen)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def _replicas(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"replicas must be a positive integer, not {value!r}")
    return int(value)


def add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dfs coordinator`; the CLI adds --secret-file globally."""
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="directory of the coordinator's LMDB environment")
    parser.add_argument("--listen", type=listen_address, metavar="HOST:PORT",
                        default=env_default("DFS_COORDINATOR", DEFAULT_LISTEN),
                        help="address to serve on (default: $DFS_COORDINATOR, which must "
                             f"then be one address, or {DEFAULT_LISTEN})")
    parser.add_argument("--replicas", type=_replicas, default=3, metavar="N",
                        help="replicas per file, fixed at the cluster's first start")
    parser.add_argument("--node-timeout", type=_positive, default=3.0, metavar="S",
                        help="seconds without a heartbeat before a node is down")
    parser.add_argument("--vote-timeout", type=_positive, default=5.0, metavar="S",
                        help="seconds to wait for a PREPARE vote")
    parser.add_argument("--gc-grace", type=_positive, default=60.0, metavar="S",
                        help="seconds a superseded blob stays readable before deletion")
    parser.add_argument("--txn-timeout", type=_positive, default=120.0, metavar="S",
                        help="seconds of client silence before an open transaction aborts")
    parser.add_argument("--unwritten-lease", type=_positive, default=UNWRITTEN_LEASE_S,
                        metavar="S",
                        help="seconds a new file's creator may go without renewing it before "
                             "it counts as abandoned and its name may be taken (default "
                             f"{UNWRITTEN_LEASE_S:.0f}; docs/design.md §6)")
    parser.add_argument("--txn-retention", type=_positive, default=60.0, metavar="S",
                        help="seconds an ended transaction record is kept before it is purged "
                             "(default 60)")
    parser.add_argument("--rereplicate-after", type=_positive, default=600.0, metavar="S",
                        help="seconds a node may be down before its replicas are re-made "
                             "on other nodes (default 600)")
    parser.add_argument("--keep-versions", type=_keep, default=0, metavar="K",
                        help="old versions each file keeps, readable and restorable (default "
                             "0: none); a directory's xattr user.dfs.keep_versions overrides "
                             "it for its subtree")
    parser.add_argument("--snapshot-piece", type=int, default=4_000, help=argparse.SUPPRESS)
    parser.add_argument("--meta", type=etcd_url, metavar="etcd://HOST:PORT[,HOST:PORT...]",
                        help="keep the metadata in etcd; several coordinators may then run, "
                             "one leads (--data is then only its cache); etcds://... talks "
                             "TLS to etcd with the --tls-* files")
    parser.add_argument("--leader-ttl", type=int, default=2, metavar="S",
                        help="with --meta: seconds of the leader's lease; a standby takes "
                             "over this long after the leader is gone (default 2)")
    parser.add_argument("--etcd-quota", type=int, default=2 * 1024**3, metavar="BYTES",
                        help="with --meta: etcd's --quota-backend-bytes, so `dfs status` "
                             "warns before writes stop (default 2 GiB, etcd's own)")
    add_metrics_argument(parser)


def _keep(value: str) -> int:
    from dfs.meta.versions import KEEP_VERSIONS_MAX

    if not value.isdigit() or int(value) > KEEP_VERSIONS_MAX:
        raise argparse.ArgumentTypeError(f"{value!r}: a number from 0 to {KEEP_VERSIONS_MAX}")
    return int(value)


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        data=Path(args.data),
        listen=args.listen,
        replicas=args.replicas,
        node_timeout=args.node_timeout,
        vote_timeout=args.vote_timeout,
        gc_grace=args.gc_grace,
        txn_timeout=args.txn_timeout,
        txn_retention=getattr(args, "txn_retention", 60.0),
        rereplicate_after=getattr(args, "rereplicate_after", 600.0),
        meta=getattr(args, "meta", None),
        leader_ttl=max(1, getattr(args, "leader_ttl", 2)),
        etcd_quota=getattr(args, "etcd_quota", 2 * 1024**3),
        keep_versions=getattr(args, "keep_versions", 0),
        snapshot_piece=max(1, getattr(args, "snapshot_piece", 4_000)),
        metrics=getattr(args, "metrics", None),
        unwritten_lease=getattr(args, "unwritten_lease", UNWRITTEN_LEASE_S),
    )
