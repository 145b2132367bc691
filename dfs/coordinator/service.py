"""CoordinatorService: every coordinator op of docs/protocol.md, and the tasks behind them.

`run()` starts, in one nursery, the LMDB writer, the commit driver (recovery, COMMIT
redelivery, expiry), the failure detector, the GC and the RPC server, then reports the
address it listens on.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio

from dfs import rpc, runtime
from dfs.errors import Code, DfsError
from dfs.meta import MetaStore, NodeState
from dfs.metrics.coordinator import CoordinatorMetrics
from dfs.metrics.rpc import service_ops
from dfs.rpc import Peers, Request
from dfs.txnops import MAX_TXN_OPS
from dfs.unwritten import UnwrittenLeases

from .check_ops import CheckOps
from .commit import CommitDriver
from .config import CoordinatorConfig
from .gc import GarbageCollector
from .membership import Membership
from .namespace_ops import NamespaceOps, Reply
from .readrepair import RepairWorker
from .refs_ops import RefsOps
from .replicate import Replicator
from .rereplicate import ReReplicator
from .snapshot_ops import SnapshotOps
from .standby import info_reply, join_address

log = logging.getLogger(__name__)

BAD_REPORTS_KEPT = 1000
#: At most this many STAGED txids judged per heartbeat (the node names up to 256).
HEARTBEAT_STAGED_MAX = 1000


def coordinator_metrics() -> CoordinatorMetrics:
    """A coordinator process's metrics, in a registry of its own."""
    return CoordinatorMetrics(ops=service_ops(CoordinatorService))


class CoordinatorService(CheckOps, NamespaceOps, SnapshotOps, RefsOps, rpc.Service):
    def __init__(self, store: MetaStore, config: CoordinatorConfig, secret: bytes,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.store = store
        self.config = config
        self.secret = secret
        # The process's metrics (they outlive a term of an HA leader); served by --metrics.
        self.metrics = metrics if metrics is not None else coordinator_metrics()
        self.rpc_metrics = self.metrics.rpc
        self.peers = Peers(secret, expect_cluster=store.cluster_id, timeout=config.rpc_timeout)
        self.membership = Membership(store, config.node_timeout)
        self.driver = CommitDriver(store, self.membership, self.peers, config, self.metrics)
        self.gc = GarbageCollector(store, self.membership, self.peers, config)
        self.bad_reports: deque[dict[str, Any]] = deque(maxlen=BAD_REPORTS_KEPT)
        self.replicator = Replicator(store, self.membership, self.peers, self.driver, config)
        self.rereplicator = ReReplicator(store, self.membership, self.replicator, config)
        self.repair_worker = RepairWorker(store, self.membership, self.replicator)
        self.replicator.on_suspects = self.repair_worker.suspects
        self.driver.on_refused = self.repair_worker.refused_commit
        self.gc.file_locks = self.replicator.file_locks  # GC of a current blob vs its repair
        self.address: str | None = None  # HOST:PORT once serving (coordinator_info)
        self.unwritten = UnwrittenLeases(config.unwritten_lease)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; task_status.started() gets "HOST:PORT" actually bound."""
        host, port = self.config.host_port
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.db.run_writer)
                await self.membership.start()
                await nursery.start(self.driver.run)
                nursery.start_soon(self.membership.run)
                nursery.start_soon(self.gc.run)
                nursery.start_soon(self.rereplicator.run)
                nursery.start_soon(self.repair_worker.run)
                nursery.start_soon(self.drop_unfinished)
                listeners = await nursery.start(
                    rpc.serve, self, host, port, self.secret, lambda: self.store.cluster_id)
                address = join_address(*listeners[0].socket.getsockname()[:2])
                self.address = address
                self.metrics.attach(self)
                log.info("cluster %s, R=%d, serving on %s", self.store.cluster_id,
                         self.store.replicas, address)
                task_status.started(address)
        finally:
            if self.metrics.service is self:
                self.metrics.attach(None)
            with trio.CancelScope(shield=True):
                await self.peers.aclose()

    # ------------------------------------------------------------ transactions

    async def op_begin(self, req: Request) -> Reply:
        ino = req.int("ino")
        base_version = req.opt_int("base_version")
        if_version = req.bool("if_version", False)
        exclude = req.list("exclude", [])
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in exclude):
            raise DfsError(Code.BAD_REQUEST, "begin: exclude must be a list of node ids")
        return await self.driver.begin(ino, base_version, if_version, exclude)

    async def op_commit(self, req: Request) -> Reply:
        txid, size = req.int("txid"), req.int("size")
        checksum, nchunks = req.bytes("checksum"), req.int("nchunks")
        mtime_ns = req.opt_int("mtime_ns")
        voted = req.list("voted", [])
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in voted):
            raise DfsError(Code.BAD_REQUEST, "commit: 'voted' must hold node ids")
        return await self.driver.commit(txid, size, checksum, nchunks, mtime_ns, tuple(voted))

    async def op_commit_txn(self, req: Request) -> Reply:
        """A multi-file transaction: every operation in `ops` or none (docs/protocol.md)."""
        return await self.driver.commit_txn(req.list("ops"))

    async def op_resolve_many(self, req: Request) -> Reply:
        """Several paths' attributes at ONE decision point (one read transaction): all
        before a multi-file commit or all after it (`dfs get --consistent`)."""
        paths = req.list("paths")
        if not paths or len(paths) > MAX_TXN_OPS or not all(isinstance(p, str) for p in paths):
            raise DfsError(Code.BAD_REQUEST, f"resolve_many: 1 to {MAX_TXN_OPS} paths")
        ns = self.store.namespace
        return {"attrs": self.store.db.read(lambda t: [ns.resolve(t, p) for p in paths])}

    async def op_abort(self, req: Request) -> Reply:
        await self.driver.abort(req.int("txid"))
        return {}

    async def op_touch(self, req: Request) -> Reply:
        self.driver.touch(req.int("txid"))
        return {}

    async def op_outcome(self, req: Request) -> Reply:
        return {"state": self.driver.outcome(req.int("txid"), writer=req.bool("writer"),
                                             node=req.int("node_id", 0))}

    async def op_txn_list(self, req: Request) -> Reply:
        return {"txns": self.driver.txn_list()}

    # ------------------------------------------------------------ cluster

    async def op_register(self, req: Request) -> Reply:
        node_id, address = req.int("node_id", 0), req.str("address")
        capacity, used = req.int("capacity", 0), req.int("used", 0)
        token = req.str("token", "")
        if len(token) > 64:
            raise DfsError(Code.BAD_REQUEST, "register: token longer than 64 characters")
        rpc.parse_address(address)
        record = await self.membership.register(node_id, address, capacity, used, token)
        return {"node_id": record.id, "cluster": self.store.cluster_id,
                "incarnation": self.membership.incarnation}

    async def op_heartbeat(self, req: Request) -> Reply:
        """Liveness and usage; the incarnation; which of the node's STAGED txids (`staged`)
        this coordinator does not know: presumed aborted, the node drops them."""
        staged = req.list("staged", [])
        if len(staged) > HEARTBEAT_STAGED_MAX or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in staged):
            raise DfsError(Code.BAD_REQUEST,
                           f"heartbeat: staged must be up to {HEARTBEAT_STAGED_MAX} txids")
        node_id = req.int("node_id")
        self.membership.heartbeat(node_id, req.int("capacity", 0), req.int("used", 0),
                                  live=req.opt_int("live"), on_disk=req.opt_int("on_disk"))
        if "stats" in req.msg:  # the node's own RPC counters, for `dfs stats`
            self.metrics.node_reported(node_id, req.dict("stats"))
        return {"incarnation": self.membership.incarnation,
                "unknown": self._unknown(node_id, staged)}

    def _unknown(self, node: int, txids: list[int]) -> list[int]:
        """Txids no open write, commit or repair of this coordinator names, and no logged
        decision names for `node` (a STAGED copy of a committed blob elsewhere is a failed
        repair's leftover)."""
        if not txids:
            return []
        driver, log_ = self.driver, self.store.txnlog
        maybe = [t for t in txids if t not in driver.open and driver.protocol.phase(t) is None
                 and t not in self.replicator.active]

        def logged(txn: Any) -> set[int]:
            out = set()
            for t in maybe:
                record = log_.get(txn, t)
                if record is not None and node in record.replicas:
                    out.add(t)
            return out

        known = self.store.db.read(logged)
        return [t for t in maybe if t not in known]

    async def op_status(self, req: Request) -> Reply:
        store = self.store
        return {
            "cluster": store.cluster_id,
            "replicas": store.replicas,
            "nodes": self.membership.describe(),
            "inflight": len(self.driver.open),
            "committing": self.driver.committing_count(),
            "gc_pending": store.db.read(store.gc.count),
            "bad_reports": len(self.bad_reports),
            "repairs": {"queued": self.repair_worker.pending(),
                        "fixed": self.repair_worker.fixed, "lost": self.repair_worker.lost},
            "rereplication": self.rereplicator.progress.to_wire(),
            "meta": await ha.describe() if (ha := getattr(self, "ha", None)) is not None
            else {"store": "lmdb"},
            "metrics": self.metrics.address,
        }

    async def op_stats(self, req: Request) -> Reply:
        """Counters since this process started and the nodes' reported ones (`dfs stats`:
        two samples an interval apart give rates)."""
        return self.metrics.snapshot()

    async def op_coordinator_info(self, req: Request) -> Reply:
        """This coordinator's role, as a standby answers it too (dfs/coordinator/standby.py)."""
        return info_reply("leader", self.address, self.address, self.store.cluster_id)

    async def op_node_list(self, req: Request) -> Reply:
        return {"nodes": self.membership.describe()}

    async def op_node_drain(self, req: Request) -> Reply:
        await self.membership.set_state(req.int("node_id"), NodeState.DRAINING)
        self.rereplicator.wake()
        return {}

    async def op_node_remove(self, req: Request) -> Reply:
        node_id = req.int("node_id")
        await self.membership.set_state(node_id, NodeState.REMOVED)
        await self.driver.forget_node(node_id)
        self.rereplicator.wake()
        return {}

    async def op_report_bad(self, req: Request) -> Reply:
        """A reader found a bad replica: queued (durably) for the read-repair worker."""
        report = {"ino": req.int("ino"), "version": req.int("version"),
                  "node_id": req.int("node_id"), "reason": req.str("reason", ""),
                  "peer": req.peer, "time_ns": runtime.wall_ns()}
        self.bad_reports.append(report)
        await self.repair_worker.report_client(report["ino"], report["version"],
                                               report["node_id"], report["reason"])
        log.warning("bad replica reported: ino %d version %d on node %d: %s", report["ino"],
                    report["version"], report["node_id"], report["reason"])
        return {}

    async def op_statfs(self, req: Request) -> Reply:
        """Space as a user sees it: raw node space divided by R."""
        store = self.store
        nodes = [n for n in self.membership.nodes.values() if n.state is not NodeState.REMOVED]
        r = max(store.replicas, 1)
        capacity = sum(n.capacity for n in nodes) // r
        used = sum(n.used for n in nodes) // r
        return {"capacity": capacity, "used": used, "free": max(capacity - used, 0),
                "files": store.db.read(store.namespace.inodes.count), "replicas": r}
