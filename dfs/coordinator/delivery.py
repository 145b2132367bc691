"""After the decision: COMMIT delivery until every replica acked (rules 3 and 5), ABORTs, and
the expiry of transactions whose client went silent. Mixed into CommitDriver.

A COMMIT refused with an error retrying cannot get past (anything but UNAVAILABLE/INTERNAL)
is not an ack: the machine keeps the decision and marks the replica bad (its repair is queued,
`CommitDriver.mark_bad`); the repair's decision re-lists the re-made copy (COMMIT again) or
drops it, and only then can the record end.

Every COMMIT and ABORT goes through the node's outbox (`outbox.py`): one sender task per node
sends what queued, for many transactions, as one request; the answers come back here, per
txid, and are fed to the machine exactly as a single request's would be."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from dfs import runtime
from dfs.errors import Code, DfsError
from dfs.failpoints import failpoint
from dfs.meta import NodeState
from dfs.metrics.coordinator import EXPIRED
from dfs.twopc import Phase, SendCommit, WriteEnd

from .outbox import ACKED, Answer, Outbox

if TYPE_CHECKING:
    from .commit import CommitDriver
    from .transactions import OpenTxn

log = logging.getLogger(__name__)

# Errors a later COMMIT/ABORT can get past; any other refusal is final.
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.INTERNAL})
ABORT_ATTEMPTS = 3


def _answers(reply: dict[str, Any]) -> dict[int, Answer]:
    """A batched reply, {acked: [txid], refused: [[txid, code, msg]]}, as answers per txid
    (a txid it does not name is left unanswered: retried, never taken for an ack)."""
    out: dict[int, Answer] = {}
    for txid in reply.get("acked") or []:
        if isinstance(txid, int):
            out[txid] = ACKED
    for item in reply.get("refused") or []:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)):
            continue
        try:
            code = Code(item[1])
        except ValueError:
            code = Code.INTERNAL
        out[item[0]] = Answer(code, str(item[2]))
    return out


class Delivery:
    async def deliver(self: CommitDriver, txid: int, nodes: list[int], first_alone: bool
                      ) -> None:
        """Send COMMIT to `nodes`. After a fresh decision the first replica goes alone, then
        the `coordinator.mid_commit` failpoint, then the others together."""
        self._delivering.add(txid)
        try:
            rest = nodes
            if first_alone and nodes:
                await self._commit_one(txid, nodes[0])
                rest = nodes[1:]
                try:
                    await failpoint("coordinator.mid_commit")
                except DfsError:
                    return  # the rest is left to redelivery
            async with trio.open_nursery() as nursery:
                for node in rest:
                    nursery.start_soon(self._commit_one, txid, node)
        finally:
            self._delivering.discard(txid)
        await self._persist_acks(txid)

    async def _commit_one(self: CommitDriver, txid: int, node: int) -> None:
        """COMMIT through the node's outbox (batched with other transactions'), then feed
        the node's answer to the machine."""
        if self.membership.address(node) is None:
            return
        answer = await self._outbox(node).post("commit", txid)
        if answer.code is None:
            await self._apply(self.protocol.commit_acked(txid, node))
        elif answer.code in RETRYABLE:
            log.debug("COMMIT %d to node %d failed, will retry: %s", txid, node, answer.msg,
                      extra={"txid": txid})
        else:
            # Not an ack (rule 5): the decision stays and owes this replica, which the
            # machine marks bad; its repair re-makes the copy and sends COMMIT again.
            await self._apply(self.protocol.commit_refused(txid, node, answer.code, answer.msg))

    def _outbox(self: CommitDriver, node: int) -> Outbox:
        """The node's outbox; its sender task starts in the driver's nursery on first use."""
        outbox = self._outboxes.get(node)
        if outbox is None:
            outbox = Outbox(node, self._send_batch)
            self.spawn(outbox.run)  # first: an outbox nobody sends from must not be found
            self._outboxes[node] = outbox
        return outbox

    def queued_to(self: CommitDriver, node: int) -> int:
        """COMMITs and ABORTs waiting in the node's outbox (not yet in a request)."""
        outbox = self._outboxes.get(node)
        return outbox.queued() if outbox is not None else 0

    async def _send_batch(self: CommitDriver, node: int, op: str, txids: list[int]
                          ) -> dict[int, Answer]:
        """One `commit`/`abort` request with `txids`; each txid's answer. A failed request
        answers every txid with its error (docs/design.md §5: never an ack)."""
        address = self.membership.address(node)
        if address is None:
            return dict.fromkeys(txids, Answer(Code.UNAVAILABLE, f"node {node} is unknown"))
        try:
            reply = await self.peers[address].call(op, timeout=self.config.rpc_timeout,
                                                   txids=txids)
        except DfsError as e:
            return dict.fromkeys(txids, Answer(e.code, e.msg))
        return _answers(reply)

    async def write_end(self: CommitDriver, txid: int) -> None:
        """Every replica acked: ENDED, unforced (a lost ENDED only means COMMIT is re-sent)."""
        log_ = self.store.txnlog
        await self.store.db.write(lambda t: log_.end(t, txid, runtime.wall_ns()), durable=False)
        await self._apply(self.protocol.end_written(txid))

    async def _persist_acks(self: CommitDriver, txid: int) -> None:
        """Remember partial acks so a restart does not re-send to those replicas. Not while a
        repair decision of this blob is being written: it may make an acked replica owe a new
        ack, and this write, queued behind it, would mark that replica acked again."""
        if self.protocol.phase(txid) is not Phase.COMMITTING \
                or self.protocol.repair_phase(txid) is Phase.DECIDING:
            return
        unacked = self.protocol.unacked(txid)
        acked = [n for n in self.protocol.replicas(txid) if n not in unacked]
        if acked:
            log_ = self.store.txnlog
            await self.store.db.write(lambda t: log_.ack(t, txid, acked, runtime.wall_ns()),
                                      durable=False)

    async def send_abort(self: CommitDriver, node: int, txid: int) -> None:
        """Best effort, through the node's outbox: a replica that misses the ABORT drops a
        STAGED blob on its own timeout and asks OUTCOME about a PREPARED one (rule 4)."""
        delay = 0.5
        for attempt in range(ABORT_ATTEMPTS):
            if self.membership.address(node) is None:
                return
            answer = await self._outbox(node).post("abort", txid)
            if answer.code is None:
                return
            if answer.code not in RETRYABLE or attempt == ABORT_ATTEMPTS - 1:
                log.info("ABORT %d to node %d not delivered: %s", txid, node, answer.msg,
                         extra={"txid": txid})
                return
            await trio.sleep(delay)
            delay *= 2

    async def redeliver_loop(self: CommitDriver) -> None:
        """Re-send owed COMMITs to replicas that are live again, until they ack (rule 3)."""
        while True:
            await trio.sleep(self.config.commit_retry_interval)
            for txid, phase, _, _ in self.protocol.transactions():
                if phase is not Phase.COMMITTING or txid in self._delivering:
                    continue
                nodes = [a.node for a in self.protocol.commit_retry(txid)
                         if isinstance(a, SendCommit) and self.membership.is_live(a.node)]
                if nodes:
                    self.spawn(self.deliver, txid, nodes, False)

    async def recover(self: CommitDriver) -> None:
        """At start: every COMMITTED-not-ENDED record owes COMMITs; the redelivery loop sends
        them as the replicas are heard from."""
        records = self.store.db.read(self.store.txnlog.pending)
        for record in records:
            actions = self.protocol.recover(record.txid, record.replicas, record.acked)
            await self._apply([a for a in actions if isinstance(a, WriteEnd)])
        for node_id, node in self.membership.nodes.items():
            if node.state is NodeState.REMOVED:
                await self.forget_node(node_id)
        if records:
            log.info("recovery: %d committed transactions still owe COMMITs", len(records))

    async def forget_node(self: CommitDriver, node_id: int) -> None:
        """A removed node will never ack. Its removal (durable in the node table, re-applied
        here at every start) is the decision that drops it from every record's list: the
        machine stops waiting for it, and records whose other replicas acked end.
        Re-replication makes its files' copies elsewhere."""
        owed = sum(1 for _, phase, replicas, acked in self.protocol.transactions()
                   if phase is Phase.COMMITTING and node_id in replicas and node_id not in acked)
        if owed:
            log.warning("node %d was removed; %d records no longer wait for its COMMIT ack",
                        node_id, owed)
        await self._apply(self.protocol.forget_node(node_id))

    # ------------------------------------------------------------ expiry

    async def expiry_loop(self: CommitDriver) -> None:
        """Abort transactions whose client went silent: no request, and no `touch` keepalive
        (the client sends one every few seconds while it streams chunks to the nodes)."""
        interval = min(1.0, self.config.txn_timeout / 4)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for txn in list(self.open.values()):
                if not txn.committing and now - txn.last_active > self.config.txn_timeout:
                    await self._expire(txn)

    async def _expire(self: CommitDriver, txn: OpenTxn) -> None:
        reason = f"client silent for {self.config.txn_timeout:g} s"
        log.warning("transaction %d (ino %d) aborted: %s", txn.txid, txn.ino, reason,
                    extra={"txid": txn.txid})
        self.open.pop(txn.txid, None)
        self.metrics.aborted(EXPIRED)
        txn.answer(DfsError(Code.UNAVAILABLE, f"transaction {txn.txid} expired: {reason}"))
        await self._apply(self.protocol.abort(txn.txid, reason))
