"""The coordinator's metadata (docs/design.md §3): namespace, transaction log, node table, GC queue
and cluster meta, each a set of methods over a caller's LMDB transaction."""

from dfs.meta.attrs import XATTR_CREATE, XATTR_REPLACE
from dfs.meta.cluster import FORMAT_VERSION, ClusterMeta
from dfs.meta.gcqueue import GcEntry, GcQueue
from dfs.meta.inode import ROOT_INO, Inode, validate_name
from dfs.meta.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from dfs.meta.nodes import NodeRecord, NodeState, NodeTable
from dfs.meta.repairs import RepairEntry, RepairQueue
from dfs.meta.store import SUBDBS, MetaStore
from dfs.meta.txnlog import TxnLog, TxnRecord, TxnState

__all__ = [
    "FORMAT_VERSION",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INO",
    "SUBDBS",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "ClusterMeta",
    "GcEntry",
    "GcQueue",
    "Inode",
    "MetaStore",
    "Namespace",
    "NodeRecord",
    "NodeState",
    "NodeTable",
    "RepairEntry",
    "RepairQueue",
    "TxnLog",
    "TxnRecord",
    "TxnState",
    "validate_name",
]
