"""The sans-IO participant, driven without sockets, clocks or disks."""

from __future__ import annotations

import random

import pytest

from dfs.errors import Code
from storage_node.participant import (
    AskOutcome,
    BlobState,
    Drop,
    ForceCommitted,
    ForcePrepared,
    Participant,
    Refuse,
    Reply,
    StageAndPrepare,
    StoreChunk,
)

STAGED, PREPARED, COMMITTED = "STAGED", "PREPARED", "COMMITTED"


def prepared(p: Participant, txid: int, now: float = 0.0) -> None:
    """Walk txid through STAGE and a successful PREPARE."""
    assert p.on_stage(txid, None, now) == StoreChunk(txid)
    assert p.on_prepare(txid, STAGED, 1) == ForcePrepared(txid)
    assert p.on_prepared(txid, now) == Reply()


def test_stage_then_prepare_then_commit() -> None:
    p = Participant()
    prepared(p, 1)
    assert p.state(1) == BlobState.PREPARED
    assert p.on_commit(1, PREPARED) == ForceCommitted(1)
    assert p.on_committed(1) == Reply()
    assert p.state(1) is None  # COMMITTED is final: the store answers for it
    assert p.on_commit(1, COMMITTED) == Reply()  # duplicate COMMIT acks again


@pytest.mark.parametrize("stored", [PREPARED, COMMITTED])
def test_prepare_again_votes_yes_again_for_the_same_content_only(stored: str) -> None:
    p = Participant()
    held = (3_000_000, b"c" * 16, 3)
    assert p.on_prepare(5, stored, 3, held=held, wanted=held) == Reply()  # nothing to force
    no = p.on_prepare(5, stored, 3, held=held, wanted=(3_000_000, b"d" * 16, 3))
    assert isinstance(no, Refuse) and no.code is Code.CONFLICT


def test_prepare_of_unknown_or_aborted_votes_no() -> None:
    p = Participant()
    no = p.on_prepare(5, None, 2)
    assert isinstance(no, Refuse) and no.code == Code.ENOENT
    p.on_stage(6, None, 0.0)
    assert p.on_abort(6, STAGED) == Drop(6)
    late = p.on_prepare(6, None, 1)
    assert isinstance(late, Refuse) and late.code == Code.CONFLICT
    # an aborted txid votes NO even if a straggling STAGE re-created its record
    assert isinstance(p.on_prepare(6, STAGED, 1), Refuse)


def test_empty_blob_prepares_with_nothing_staged() -> None:
    p = Participant()
    assert p.on_prepare(8, None, 0) == ForcePrepared(8)
    p.on_prepared(8, 0.0)
    assert p.state(8) == BlobState.PREPARED


def test_failed_prepare_leaves_blob_staged_and_stageable() -> None:
    p = Participant()
    p.on_stage(1, None, 0.0)
    p.on_prepare(1, STAGED, 1)
    refused = p.on_stage(1, STAGED, 0.5)  # no staging while the blob is being verified
    assert isinstance(refused, Refuse) and refused.code == Code.CONFLICT
    p.on_prepare_failed(1, 1.0)
    assert p.state(1) == BlobState.STAGED
    assert p.on_stage(1, STAGED, 1.5) == StoreChunk(1)


def test_stage_carrying_prepare_stores_and_votes_in_one_forced_write() -> None:
    """docs/design.md §5, rule 2: a one-chunk blob staged and prepared in one message is
    PREPARED from then on, and its OUTCOME timer runs as after PREPARE (a client that dies
    before COMMIT leaves a copy that must be asked about, never kept forever)."""
    p = Participant(outcome_after_s=10.0)
    assert p.on_stage_prepare(1, None, 1, 0.0) == StageAndPrepare(1)
    refused = p.on_stage(1, STAGED, 0.1)  # no staging while it is being verified
    assert isinstance(refused, Refuse) and refused.code == Code.CONFLICT
    assert p.on_prepared(1, 0.5) == Reply()
    assert p.state(1) == BlobState.PREPARED
    assert p.leftovers_to_name(100.0) == []  # PREPARED: never presumed aborted by heartbeat
    assert p.on_tick(10.0) == []
    assert p.on_tick(10.6) == [AskOutcome(1)]
    assert p.on_outcome(1, "inflight", 10.7) is None  # the client is still STAGING
    assert p.on_tick(11.0) == []  # asked again after a backoff
    assert p.on_tick(20.0) == [AskOutcome(1)]
    assert p.on_outcome(1, "aborted", 20.1) == Drop(1)
    late = p.on_stage_prepare(1, None, 1, 21.0)
    assert isinstance(late, Refuse) and late.code == Code.CONFLICT


def test_an_outcome_for_a_blob_committed_meanwhile_changes_nothing() -> None:
    """COMMITTED is final: an OUTCOME answer that finds the store already committed (the
    COMMIT won the race) forces nothing, and the txid is no longer asked about."""
    p = Participant(outcome_after_s=1)
    p.on_stage(1, None, 0.0)
    p.on_prepare(1, STAGED, 1)
    p.on_prepared(1, 0.0)
    assert p.on_outcome(1, "committed", 2.0, COMMITTED) is None
    assert p.state(1) is None and p.on_tick(100.0) == []


def test_stage_carrying_prepare_follows_the_stage_and_prepare_rules() -> None:
    p = Participant()
    # Already PREPARED or COMMITTED (a re-sent message): a YES again if the content matches.
    held = (10, b"c" * 16, 1)
    assert p.on_stage_prepare(2, PREPARED, 1, 0.0, held=held, wanted=held) == Reply()
    assert p.on_stage_prepare(3, COMMITTED, 1, 0.0, held=held, wanted=held) == Reply()
    assert isinstance(p.on_stage_prepare(3, COMMITTED, 1, 0.0, held=held,
                                         wanted=(11, b"c" * 16, 1)), Refuse)
    # Aborted: NO, as both STAGE and PREPARE say.
    p.on_stage(4, None, 0.0)
    assert p.on_abort(4, STAGED) == Drop(4)
    assert isinstance(p.on_stage_prepare(4, None, 1, 0.0), Refuse)
    # The last chunk of a blob whose others are staged: a STAGED record is fine.
    p.on_stage(5, None, 0.0)
    assert p.on_stage_prepare(5, STAGED, 2, 0.0) == StageAndPrepare(5)
    # A failure is a NO that leaves the blob STAGED and stageable again.
    p.on_prepare_failed(5, 1.0)
    assert p.state(5) == BlobState.STAGED
    assert p.on_stage(5, STAGED, 1.5) == StoreChunk(5)


def test_stage_refused_after_prepare_or_abort() -> None:
    p = Participant()
    assert isinstance(p.on_stage(1, PREPARED, 0.0), Refuse)
    assert isinstance(p.on_stage(1, COMMITTED, 0.0), Refuse)
    p.on_abort(2, None)
    assert isinstance(p.on_stage(2, None, 0.0), Refuse)


def test_abort_that_overtakes_a_stage_write_drops_again() -> None:
    p = Participant()
    assert p.on_stage(3, None, 0.0) == StoreChunk(3)
    assert p.on_staged(3) is None
    assert p.on_stage(3, STAGED, 0.0) == StoreChunk(3)
    p.on_abort(3, STAGED)  # arrives while the second chunk is being written
    assert p.on_staged(3) == Drop(3)


def test_abort_never_drops_committed() -> None:
    p = Participant()
    refused = p.on_abort(4, COMMITTED)
    assert isinstance(refused, Refuse) and refused.code == Code.CONFLICT
    assert p.on_abort(4, PREPARED) == Drop(4)  # the coordinator decided abort
    assert p.on_abort(4, None) == Drop(4)  # duplicates are harmless


def test_commit_rules() -> None:
    p = Participant()
    assert isinstance(p.on_commit(1, STAGED), Refuse)  # never prepared: a protocol error
    p.on_abort(3, STAGED)
    assert isinstance(p.on_commit(3, None), Refuse)


def test_commit_of_a_blob_the_node_does_not_have_is_refused() -> None:
    """An ack would end the decision while this node holds nothing: a PREPARED copy that was
    lost, or one GC deleted once a later write superseded it (the coordinator then releases
    the refusal). Either way ENOENT, and nothing is left to ask OUTCOME about."""
    p = Participant(outcome_after_s=1)
    prepared(p, 2)
    action = p.on_commit(2, None)  # the store lost the PREPARED copy
    assert isinstance(action, Refuse) and action.code is Code.ENOENT
    assert p.state(2) is None and p.on_tick(100.0) == []
    action = p.on_commit(5, None)  # never heard of here at all
    assert isinstance(action, Refuse) and action.code is Code.ENOENT


def test_commit_of_a_committed_blob_acks_again() -> None:
    p = Participant()
    prepared(p, 1)
    assert p.on_commit(1, PREPARED) == ForceCommitted(1)
    p.on_committed(1)
    assert p.on_commit(1, COMMITTED) == Reply()
    assert p.on_commit(1, COMMITTED) == Reply()
    assert p.on_commit(7, COMMITTED) == Reply()  # a repair's copy, committed before a restart


def test_idle_staged_blob_is_dropped_after_timeout() -> None:
    p = Participant(staged_timeout_s=10)
    p.on_stage(1, None, 0.0)
    p.on_stage(1, STAGED, 8.0)  # activity resets the clock
    assert p.on_tick(15.0) == []
    assert p.on_tick(18.5) == [Drop(1)]
    assert p.aborted(1) and p.state(1) is None
    assert isinstance(p.on_prepare(1, STAGED, 1), Refuse)  # a late PREPARE votes NO
    assert p.on_tick(100.0) == []


def test_blob_being_prepared_is_not_timed_out() -> None:
    p = Participant(staged_timeout_s=1)
    p.on_stage(1, None, 0.0)
    p.on_prepare(1, STAGED, 1)
    assert p.on_tick(50.0) == []
    p.on_prepared(1, 50.0)
    assert p.state(1) == BlobState.PREPARED


def test_restart_asks_outcome_of_prepared_and_ages_staged() -> None:
    p = Participant(staged_timeout_s=300)
    p.restore(1, PREPARED, created=0.0, now=1000.0)
    p.restore(2, STAGED, created=500.0, now=1000.0)  # old: dropped at once
    p.restore(3, STAGED, created=990.0, now=1000.0)  # recent: kept for now
    p.restore(4, COMMITTED, created=0.0, now=1000.0)
    actions = p.on_tick(1000.0)
    assert set(actions) == {AskOutcome(1), Drop(2)}
    assert p.on_tick(1000.1) == []  # not asked again while the question is out
    assert p.in_flight() == {1: BlobState.PREPARED, 3: BlobState.STAGED}


def test_outcome_committed_commits() -> None:
    p = Participant()
    p.restore(1, PREPARED, created=0.0, now=0.0)
    assert p.on_tick(0.0) == [AskOutcome(1)]
    assert p.on_outcome(1, "committed", 0.1) == ForceCommitted(1)
    p.on_committed(1)
    assert p.state(1) is None and p.on_tick(100.0) == []


def test_outcome_aborted_drops_and_remembers() -> None:
    p = Participant()
    p.restore(1, PREPARED, created=0.0, now=0.0)
    p.on_tick(0.0)
    assert p.on_outcome(1, "aborted", 0.1) == Drop(1)
    assert p.aborted(1) and p.state(1) is None
    assert isinstance(p.on_prepare(1, None, 1), Refuse)


def test_a_failed_drop_is_tried_again_with_backoff_until_it_is_done() -> None:
    p = Participant(outcome_retry_max_s=2.0)
    assert p.on_abort(1, STAGED) == Drop(1)
    p.on_drop_failed(Drop(1), 10.0)  # the disk was full
    assert p.on_tick(10.4) == []
    assert p.on_tick(10.5) == [Drop(1)]
    assert p.on_tick(10.6) == []  # not again while that one is out
    p.on_drop_failed(Drop(1), 10.6)
    assert p.on_tick(11.5) == [] and p.on_tick(11.6) == [Drop(1)]  # backoff doubled
    assert isinstance(p.on_stage(1, STAGED, 11.6), Refuse)  # still aborted meanwhile
    p.on_dropped(1)
    assert p.on_tick(100.0) == []


def test_inflight_or_unreachable_asks_again_with_backoff() -> None:
    p = Participant(outcome_retry_max_s=4)
    p.restore(1, PREPARED, created=0.0, now=0.0)
    asked_at = []
    now = 0.0
    while now < 30 and len(asked_at) < 8:
        for action in p.on_tick(now):
            assert action == AskOutcome(1)
            asked_at.append(now)
            if len(asked_at) % 2:
                assert p.on_outcome(1, "inflight", now) is None
            else:
                p.on_outcome_failed(1, now)
        now = round(now + 0.25, 2)
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:], strict=False)]
    assert len(asked_at) == 8
    assert gaps == sorted(gaps) and gaps[0] < 1.0 and 3.5 <= gaps[-1] <= 4.5


def test_prepared_in_normal_run_asks_only_after_outcome_after() -> None:
    p = Participant(outcome_after_s=10)
    prepared(p, 1, now=100.0)
    assert p.on_tick(105.0) == []
    assert p.on_tick(110.0) == [AskOutcome(1)]


def test_outcome_after_resolution_is_ignored() -> None:
    p = Participant()
    p.restore(1, PREPARED, created=0.0, now=0.0)
    p.on_tick(0.0)
    assert p.on_commit(1, PREPARED) == ForceCommitted(1)
    p.on_committed(1)
    assert p.on_outcome(1, "aborted", 1.0) is None  # a stale answer never drops a commit


def test_leftovers_are_named_when_idle_and_dropped_when_unknown() -> None:
    p = Participant(leftover_age_s=2.0)
    p.on_stage(1, None, 0.0)
    p.on_stage(2, None, 0.0)
    p.incarnation = 7
    assert p.leftovers_to_name(1.0) == []  # busy: not yet named
    p.on_stage(2, STAGED, 1.5)
    assert p.leftovers_to_name(2.5) == [1]
    assert p.on_presumed_aborted(2) is None  # not named in that beat: kept
    drop = p.on_presumed_aborted(1)
    assert drop == Drop(1) and drop.allowed == frozenset({None, STAGED})
    assert p.aborted(1) and p.state(1) is None  # a late STAGE is refused
    assert isinstance(p.on_stage(1, None, 3.0), Refuse)
    assert p.state(2) == BlobState.STAGED
    assert p.leftovers_to_name(3.6) == [2]
    assert p.leftovers_to_name(3.7) == []  # named once a second at most


def test_a_coordinator_restart_names_every_staged_and_asks_every_prepared() -> None:
    p = Participant(leftover_age_s=60.0, outcome_after_s=100.0)
    prepared(p, 1)
    p.on_stage(2, None, 0.0)
    assert p.on_incarnation(1, 0.5)  # first heard: counts as a change
    assert p.leftovers_to_name(0.5) == [2]
    p.on_incarnation(1, 0.6)
    assert not p.on_incarnation(1, 0.7)
    assert p.on_incarnation(2, 1.0)  # restarted
    assert p.on_tick(1.0) == [AskOutcome(1)]  # not after outcome_after_s: at once
    assert p.leftovers_to_name(2.0) == [2]


def test_presumed_abort_spares_a_re_staged_or_preparing_blob() -> None:
    p = Participant(leftover_age_s=1.0)
    p.on_stage(1, None, 0.0)
    p.on_stage(2, None, 0.0)
    assert p.leftovers_to_name(5.0) == [1, 2]
    p.forget(1)  # a repair fetches blob 1 afresh meanwhile
    p.on_stage(1, None, 5.1)
    assert p.on_prepare(2, STAGED, 1) == ForcePrepared(2)  # a PREPARE raced the answer
    assert p.on_presumed_aborted(1) is None and p.on_presumed_aborted(2) is None
    assert p.state(1) == BlobState.STAGED


def test_actions_name_the_states_the_store_may_change() -> None:
    p = Participant(staged_timeout_s=1.0)
    assert p.on_stage(1, None, 0.0).allowed == frozenset({None, STAGED})
    prepared(p, 2)
    assert p.on_commit(2, PREPARED).allowed == frozenset({PREPARED})
    assert COMMITTED not in p.on_abort(3, STAGED).allowed
    (drop,) = p.on_tick(5.0)
    assert drop == Drop(1) and PREPARED not in drop.allowed  # a timeout takes no PREPARED blob


def test_aborted_memory_is_bounded() -> None:
    p = Participant(remember_aborted=100)
    for txid in range(1000):
        p.on_abort(txid, None)
    assert p.aborted(999) and p.state(999) is None and p.state(0) is None
    assert len(p._aborted) == 100


# ---------------------------------------------------------------- randomized protocol runs


def _run_one(seed: int) -> None:
    """A coordinator that follows presumed-abort 2PC, a lossy/duplicating network and a model
    store; the participant's actions must keep every decision: a committed txid ends COMMITTED,
    an aborted one never becomes COMMITTED, and a YES-voted blob is dropped only after an abort.
    """
    rnd = random.Random(seed)
    p = Participant(staged_timeout_s=5, outcome_after_s=3)
    store: dict[int, str] = {}
    decision: dict[int, str] = {}
    voted_yes: set[int] = set()
    now = 0.0

    def execute(action: object, txid: int) -> None:
        if isinstance(action, StoreChunk):
            store.setdefault(txid, STAGED)
            if p.on_staged(txid):
                store.pop(txid, None)
        elif isinstance(action, ForcePrepared):
            if store.get(txid) == STAGED or (txid not in store and rnd.random() < 0.1):
                store[txid] = PREPARED
            if store.get(txid) in (PREPARED, COMMITTED):
                p.on_prepared(txid, now)
                voted_yes.add(txid)
            else:
                p.on_prepare_failed(txid, now)
        elif isinstance(action, ForceCommitted):
            assert store[txid] in (PREPARED, COMMITTED)
            store[txid] = COMMITTED
            p.on_committed(txid)
        elif isinstance(action, Drop):
            assert store.get(txid) != COMMITTED
            if txid in voted_yes:
                assert decision.get(txid) == "aborted", f"seed {seed}: dropped a YES blob"
            store.pop(txid, None)

    for _ in range(300):
        now += rnd.random()
        txid = rnd.randint(1, 8)
        event = rnd.choice(["stage", "prepare", "decide", "commit", "abort", "tick", "restart"])
        if event == "stage" and txid not in decision:
            execute(p.on_stage(txid, store.get(txid), now), txid)
        elif event == "prepare" and txid not in decision:
            execute(p.on_prepare(txid, store.get(txid), 1), txid)
        elif event == "decide" and txid not in decision:
            decision[txid] = "committed" if txid in voted_yes and rnd.random() < 0.7 else "aborted"
        elif event == "commit" and decision.get(txid) == "committed":
            execute(p.on_commit(txid, store.get(txid)), txid)
        elif event == "abort" and decision.get(txid) == "aborted":
            execute(p.on_abort(txid, store.get(txid)), txid)
        elif event == "tick":
            for action in p.on_tick(now):
                if isinstance(action, AskOutcome):
                    answer = decision.get(action.txid, "inflight")
                    if rnd.random() < 0.3:
                        p.on_outcome_failed(action.txid, now)
                    else:
                        execute(p.on_outcome(action.txid, answer, now), action.txid)
                else:
                    execute(action, action.txid)
        elif event == "restart":
            p = Participant(staged_timeout_s=5, outcome_after_s=3)
            for t, state in store.items():
                p.restore(t, state, created=now - 1, now=now)
    # Deliver every decision once more (the coordinator re-sends COMMIT until acked).
    for txid, outcome in decision.items():
        if outcome == "committed":
            execute(p.on_commit(txid, store.get(txid)), txid)
            assert store[txid] == COMMITTED, f"seed {seed}: committed txid {txid} lost"
        else:
            assert store.get(txid) != COMMITTED, f"seed {seed}: aborted txid {txid} committed"


@pytest.mark.parametrize("seed", range(200))
def test_randomized_runs_keep_decisions(seed: int) -> None:
    _run_one(seed)
