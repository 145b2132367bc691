"""Per-node outboxes for COMMIT and ABORT: many transactions' messages in one RPC.

After a decision each replica is sent COMMIT (docs/design.md §5, rules 3 and 5); a message
per (txid, node) made Python's per-request cost, not the fsync, the limit under concurrent
writers. An `Outbox` holds what is owed to one node, and its one sender task sends whatever
queued as one `commit` (or `abort`) request with `txids`, up to MAX_COMMIT_BATCH. It sends
at once when idle (a lone COMMIT waits for nobody); batches form from what queued while the
previous request was in flight, as group commit does.

The outbox only carries messages. Each poster gets its txid's `Answer` back and feeds it to
the 2PC machine itself (`Delivery._commit_one`), so every protocol-state change stays in
dfs/twopc.py and the ack handling of concurrent transactions (their ENDED writes) stays
concurrent too.

Error policy: an RPC that fails (network, timeout, an error reply for the whole request)
answers every txid it carried with that error, which the poster treats as it always has
(UNAVAILABLE/INTERNAL: left for redelivery; anything else: a refusal, never an ack). Any
other exception in the sender is a bug: its posters are answered UNAVAILABLE and the
exception crashes the driver's nursery, and so the coordinator (fail-stop; on restart
`recover()` reloads every owed COMMIT from the log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from dfs.errors import Code

log = logging.getLogger(__name__)

#: At most this many txids in one batched COMMIT or ABORT request (the node accepts up to
#: storage_node.server.MAX_TXIDS_PER_COMMIT).
MAX_COMMIT_BATCH = 256
#: At most this many txids queued per node and op; beyond, a message is answered UNAVAILABLE
#: at once (a COMMIT is then left for redelivery, an ABORT to the node's own timeout).
MAX_QUEUED = 100_000
OPS = ("commit", "abort")


@dataclass(frozen=True, slots=True)
class Answer:
    """A node's answer about one txid: `code` None is an ack, anything else its error."""

    code: Code | None = None
    msg: str = ""


ACKED = Answer()
NOT_ANSWERED = Answer(Code.UNAVAILABLE, "no answer for this txid")

#: send(node, op, txids) -> each txid's answer (a txid left out counts as NOT_ANSWERED).
Sender = Callable[[int, str, list[int]], Awaitable[dict[int, Answer]]]


class _Slot:
    """One queued (op, txid): every poster of it shares its answer."""

    __slots__ = ("answer", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer = NOT_ANSWERED


class Outbox:
    """What one node is owed; `run` is its sender task."""

    def __init__(self, node: int, send: Sender) -> None:
        self.node = node
        self._send = send
        self._queues: dict[str, dict[int, _Slot]] = {op: {} for op in OPS}
        self._wake = trio.Event()
        self.requests = 0  # requests sent (for a look in a debugger or a test)

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def post(self, op: str, txid: int) -> Answer:
        """Queue `op` for txid (joining one already queued) and wait for the node's answer."""
        queue = self._queues[op]
        slot = queue.get(txid)
        if slot is None:
            if len(queue) >= MAX_QUEUED:
                return Answer(Code.UNAVAILABLE, f"outbox of node {self.node} is full")
            slot = queue[txid] = _Slot()
            self._wake.set()
        await slot.done.wait()
        return slot.answer

    async def run(self) -> None:
        """Forever: wait for messages, then send each op's queue, a batch per request."""
        while True:
            if not self.queued():
                self._wake = trio.Event()
                await self._wake.wait()
            for op in OPS:
                if self._queues[op]:
                    await self._flush(op)

    async def _flush(self, op: str) -> None:
        queue = self._queues[op]
        txids = list(queue)[:MAX_COMMIT_BATCH]
        batch = {txid: queue.pop(txid) for txid in txids}
        answers: dict[int, Answer] = {}
        try:
            self.requests += 1
            answers = await self._send(self.node, op, txids)
        finally:  # also on a bug or cancellation: no poster waits forever
            for txid, slot in batch.items():
                slot.answer = answers.get(txid, NOT_ANSWERED)
                slot.done.set()
