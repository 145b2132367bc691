"""MetaStore: the coordinator's one LMDB environment behind the narrow interface.

The server sees only `namespace` (with its blob index), `txnlog`, `nodes`, `gc` and `cluster`, each a set of methods
over an LMDB transaction, and runs them via `db.write` / `db.read`. A replicated engine can
later provide the same objects (docs/design.md §3).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from dfs import runtime
from dfs.db import Database
from dfs.meta.cluster import BLOB_INDEX, ClusterMeta
from dfs.meta.gcqueue import GcQueue
from dfs.meta.namespace import Namespace
from dfs.meta.nodes import NodeTable
from dfs.meta.repairs import RepairQueue
from dfs.meta.scan import MetaScan
from dfs.meta.snapshots import SUBDBS as SNAPSHOT_SUBDBS
from dfs.meta.txnlog import TxnLog

if TYPE_CHECKING:
    from dfs.etcd.mirror import EtcdMirror

SUBDBS = ["inodes", "dentries", "dircookies", "txns", "nodes", "gc", "meta", "repairs", "blobs",
          "versions", "retained", *SNAPSHOT_SUBDBS]
DEFAULT_GC_GRACE_NS = 60 * 1_000_000_000


class MetaStore:
    def __init__(self, db: Database, *, gc_grace_ns: int = DEFAULT_GC_GRACE_NS,
                 keep_versions: int = 0) -> None:
        self.db = db
        self.cluster = ClusterMeta(db)
        self.gc = GcQueue(db)
        self.namespace = Namespace(db, self.cluster, self.gc, gc_grace_ns, keep_versions)
        self.txnlog = TxnLog(db, self.cluster)
        self.nodes = NodeTable(db, self.cluster)
        self.repairs = RepairQueue(db)
        self.scan = MetaScan(db)
        self.cluster_id = ""
        self.replicas = 0

    @classmethod
    def open(cls, path: Path | str, *, replicas: int = 3, gc_grace_ns: int = DEFAULT_GC_GRACE_NS,
             map_size: int = 1 << 30, mirror: EtcdMirror | None = None,
             keep_versions: int = 0, loaded: bool = False) -> MetaStore:
        """Open (creating at first start) the environment in directory `path` (path/data.mdb).

        Runs before the writer task exists, hence the synchronous durable write. `replicas` is
        used at first start only; afterwards the stored R wins.

        With `mirror` the metadata lives in etcd (dfs/etcd/mirror.py) and `path` is only its
        cache: emptied, loaded from etcd, and every write goes to etcd first. `loaded` says
        the cache already equals etcd (a warm standby's, dfs/etcd/follower.py): kept as is.
        """
        assert not loaded or mirror is not None, "only a cache of etcd can be loaded already"
        if mirror is not None and not loaded:
            mirror.prepare(path)
        store = cls(Database(path, SUBDBS, map_size=map_size, mirror=mirror),
                    gc_grace_ns=gc_grace_ns, keep_versions=keep_versions)
        try:
            if mirror is not None and not loaded:
                mirror.load(store.db)
            store.db.write_now(lambda txn: store._initialize(txn, replicas))
        except BaseException:
            store.db.close()
            raise
        return store

    def _initialize(self, txn: lmdb.Transaction, replicas: int) -> None:
        self.cluster.initialize(txn, replicas)
        self.namespace.init_root(txn, runtime.wall_ns())
        if not self.cluster.get(txn, BLOB_INDEX):  # metadata from before the index
            self.namespace.inodes.build_blob_index(txn)
            self.cluster.put(txn, BLOB_INDEX, 1)
        self.cluster_id = self.cluster.cluster_id(txn)
        self.replicas = self.cluster.replicas(txn)

    def close(self) -> None:
        self.db.close()
