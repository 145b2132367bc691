"""The coordinator's 2PC state machine, driven by hand: no sockets, no clock, no disk."""

from dfs.errors import Code
from dfs.twopc import (
    CommitProtocol,
    MarkBad,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendCommit,
    SendPrepare,
    WriteDecision,
    WriteEnd,
    WriteRepairDecision,
)

R = (1, 2, 3)
CK = b"\x01" * 16


def started(txid: int = 7) -> CommitProtocol:
    p = CommitProtocol()
    assert p.begin(txid, R) == []
    return p


def test_happy_path_decides_once_all_vote_yes_and_ends_after_all_acks() -> None:
    p = started()
    assert p.request_commit(7, 10, CK, 1) == [SendPrepare(n, 7, 10, CK, 1) for n in R]
    assert p.vote(7, 1, True) == []
    assert p.vote(7, 2, True) == []
    assert p.is_in_flight(7)
    assert p.vote(7, 3, True) == [WriteDecision(7)]
    assert p.is_in_flight(7), "until the decision is durable the txid is in flight"
    assert p.decision_written(7) == [ReplyOk(7), *(SendCommit(n, 7) for n in R)]
    assert not p.is_in_flight(7)
    assert p.commit_acked(7, 1) == []
    assert p.commit_retry(7) == [SendCommit(2, 7), SendCommit(3, 7)]
    assert p.commit_acked(7, 2) == []
    assert p.commit_acked(7, 2) == [], "a duplicate ack changes nothing"
    assert p.commit_acked(7, 3) == [WriteEnd(7)]
    assert p.end_written(7) == []
    assert p.phase(7) is None


def test_replicas_that_voted_in_their_stage_are_not_sent_prepare() -> None:
    """docs/design.md §5, rule 2: a STAGE carrying the prepare fields is a YES vote; the
    commit names those replicas and only the others are sent PREPARE."""
    p = started()
    assert p.request_commit(7, 10, CK, 1, voted=[1, 3]) == [SendPrepare(2, 7, 10, CK, 1)]
    assert p.phase(7) is Phase.PREPARING
    assert p.vote(7, 2, True) == [WriteDecision(7)]


def test_every_replica_voted_goes_straight_to_the_decision() -> None:
    p = started()
    assert p.request_commit(7, 10, CK, 1, voted=R) == [WriteDecision(7)]
    assert p.phase(7) is Phase.DECIDING and p.is_in_flight(7)
    assert p.request_commit(7, 10, CK, 1, voted=R) == [], "a duplicate commit changes nothing"
    assert p.decision_written(7) == [ReplyOk(7), *(SendCommit(n, 7) for n in R)]


def test_a_vote_from_a_node_that_is_not_a_replica_earns_nothing() -> None:
    p = started()
    actions = p.request_commit(7, 10, CK, 1, voted=[1, 2, 9, 9])
    assert actions == [SendPrepare(3, 7, 10, CK, 1)]
    assert p.vote(7, 9, True) == []
    assert p.vote(7, 3, True) == [WriteDecision(7)]


def test_a_no_from_a_replica_that_was_sent_prepare_aborts_the_voters_too() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1, voted=[1, 2])
    actions = p.vote(7, 3, False, Code.ENOSPC, "full")
    assert actions[:3] == [SendAbort(n, 7) for n in R]  # the voters' PREPARED copies go too
    assert isinstance(actions[3], ReplyError) and actions[3].failed == (3,)


def test_one_no_vote_aborts_everywhere_and_names_the_node() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1)
    p.vote(7, 1, True)
    actions = p.vote(7, 2, False, Code.CHECKSUM, "bad chunk")
    assert actions[:3] == [SendAbort(n, 7) for n in R]
    reply = actions[3]
    assert isinstance(reply, ReplyError)
    assert reply.code is Code.UNAVAILABLE and reply.failed == (2,)
    assert p.phase(7) is None and not p.is_in_flight(7)
    assert p.vote(7, 3, True) == [], "a vote after the abort is ignored"


def test_enospc_vote_is_reported_as_enospc() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1)
    reply = p.vote(7, 3, False, Code.ENOSPC)[-1]
    assert isinstance(reply, ReplyError) and reply.code is Code.ENOSPC


def test_vote_timeout_aborts_only_while_preparing() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1)
    p.vote(7, 1, True)
    actions = p.vote_timeout(7)
    assert isinstance(actions[-1], ReplyError) and actions[-1].failed == (2, 3)
    q = started()
    q.request_commit(7, 10, CK, 1)
    for n in R:
        q.vote(7, n, True)
    assert q.vote_timeout(7) == [], "after the last YES a timeout can no longer abort"
    assert q.phase(7) is Phase.DECIDING


def test_refused_decision_aborts_with_the_namespace_error() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1)
    for n in R:
        p.vote(7, n, True)
    actions = p.decision_refused(7, Code.CONFLICT, "version moved on")
    assert actions[:3] == [SendAbort(n, 7) for n in R]
    assert actions[3] == ReplyError(7, Code.CONFLICT, "version moved on", ())


def test_commit_of_unknown_txid_is_retryable_and_client_abort_sends_abort() -> None:
    p = CommitProtocol()
    reply = p.request_commit(99, 1, CK, 1)[0]
    assert isinstance(reply, ReplyError) and reply.code is Code.UNAVAILABLE
    q = started()
    assert q.abort(7) == [SendAbort(n, 7) for n in R]
    assert not q.is_in_flight(7)
    assert q.abort(7) == []


def test_duplicate_commit_request_changes_nothing() -> None:
    p = started()
    p.request_commit(7, 10, CK, 1)
    assert p.request_commit(7, 10, CK, 1) == []
    assert p.phase(7) is Phase.PREPARING


def test_recover_resends_commit_to_unacked_replicas_only() -> None:
    p = CommitProtocol()
    assert p.recover(5, R, acked=[2]) == [SendCommit(1, 5), SendCommit(3, 5)]
    assert p.commit_acked(5, 1) == []
    assert p.commit_acked(5, 3) == [WriteEnd(5)]
    assert CommitProtocol().recover(6, R, acked=list(R)) == [WriteEnd(6)]


# ---------------------------------------------------------------- rule 5: a refusal is no ack


def test_refused_commit_is_not_an_ack_and_the_repair_decision_ends_it() -> None:
    p = CommitProtocol()
    p.recover(5, R)
    assert p.commit_refused(5, 2, Code.CONFLICT, "aborted") == [
        MarkBad(5, 2, "refused COMMIT: aborted")]
    assert p.commit_refused(5, 2, Code.CONFLICT) == [], "marked bad once"
    assert p.commit_retry(5) == [SendCommit(1, 5), SendCommit(3, 5)], "no COMMIT to it again"
    assert p.commit_acked(5, 1) == [] and p.commit_acked(5, 3) == []
    assert p.commit_acked(5, 2) == [], "a refused replica's stray ack is not its re-made copy's"
    assert p.phase(5) is Phase.COMMITTING and p.unacked(5) == (2,), "the decision stays"
    # The repair re-makes the copy in place: the decision re-lists it and it owes a new ack.
    assert p.begin_repair(5, [2]) == []
    assert p.repair_prepared(5, [2]) == [WriteRepairDecision(5, (2,))]
    assert p.repair_decision_written(5, R) == [SendCommit(2, 5)]
    assert p.refused(5) == ()
    assert p.commit_acked(5, 2) == [WriteEnd(5)]


def test_a_refused_replica_no_longer_listed_is_released() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=[1, 3])
    p.commit_refused(5, 2, Code.ENOSPC)
    assert p.excuse_ack(5, 1) == [], "only a refused replica is excused this way"
    assert p.excuse_ack(5, 2) == [WriteEnd(5)]


def test_a_removed_node_owes_no_ack() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=[1])
    p.recover(6, R, acked=[1, 2])
    assert p.forget_node(3) == [WriteEnd(6)]
    assert p.unacked(5) == (2,)


def test_a_node_removed_while_a_decision_is_written_owes_no_ack() -> None:
    """Found by the nemesis: a transaction whose replicas had all voted when node 3 was
    removed was decided after it, and waited for node 3's ack for good."""
    p = CommitProtocol()
    p.begin(7, R)
    assert p.request_commit(7, 1, b"c", 1, voted=R) == [WriteDecision(7)]
    assert p.forget_node(3) == []  # DECIDING: nothing to drop yet
    assert p.decision_written(7) == [ReplyOk(7), SendCommit(1, 7), SendCommit(2, 7)]
    assert p.commit_acked(7, 1) == []
    assert p.commit_acked(7, 2) == [WriteEnd(7)]


# ---------------------------------------------------------------- the repair transaction


def test_repair_of_a_blob_whose_record_is_gone_is_in_flight_then_committed() -> None:
    p = CommitProtocol()
    assert not p.is_in_flight(9) and not p.is_committed(9)
    p.begin_repair(9, [4, 5], new=[4, 5])
    assert p.is_in_flight(9), "OUTCOME: ask again later, never 'aborted'"
    assert p.repair_prepared(9, [4]) == [SendAbort(5, 9), WriteRepairDecision(9, (4,))]
    assert p.is_in_flight(9) and not p.is_committed(9)
    assert p.repair_decision_written(9, [1, 2, 4]) == [SendCommit(4, 9)]
    assert p.is_committed(9) and not p.is_in_flight(9), "OUTCOME: committed"
    assert p.replicas(9) == (4,)
    assert p.commit_acked(9, 4) == [WriteEnd(9)]
    assert p.end_written(9) == [] and p.phase(9) is None


def test_repair_with_no_good_copy_aborts_its_new_targets_and_is_gone() -> None:
    p = CommitProtocol()
    p.begin_repair(9, [2, 4], new=[4])
    assert p.repair_prepared(9, [], []) == [SendAbort(4, 9)]
    assert not p.is_in_flight(9)
    p.begin_repair(9, [4], new=[4])
    assert p.repair_abandoned(9) == [SendAbort(4, 9)]
    assert not p.is_in_flight(9)


def test_repair_merges_into_the_committing_entry_and_drops_replaced_replicas() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=[1])
    p.begin_repair(5, [4], new=[4])
    assert p.repair_prepared(5, [4]) == [WriteRepairDecision(5, (4,))]
    # 2 acks while the repair decision is written: the record may not end meanwhile.
    assert p.commit_acked(5, 2) == []
    assert p.repair_decision_written(5, [1, 2, 4]) == [SendCommit(4, 5)]
    assert p.replicas(5) == (1, 2, 4) and p.unacked(5) == (4,), "3 was replaced by 4"
    assert p.commit_acked(5, 4) == [WriteEnd(5)]


def test_acks_during_a_refused_repair_decision_end_the_record_afterwards() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=[1, 2])
    p.begin_repair(5, [3, 4], new=[4])
    p.repair_prepared(5, [3, 4])
    assert p.commit_acked(5, 3) == [], "held back while the repair decision is written"
    assert p.repair_decision_refused(5) == [SendAbort(3, 5), SendAbort(4, 5), WriteEnd(5)]


def test_repair_decision_waits_while_the_blob_record_is_ending() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=[1, 2])
    assert p.commit_acked(5, 3) == [WriteEnd(5)]
    p.begin_repair(5, [3])
    assert p.repair_prepared(5, [3]) == [], "not while the ENDED write is under way"
    assert p.is_committed(5)
    assert p.end_written(5) == [WriteRepairDecision(5, (3,))]
    assert p.is_in_flight(5)
    assert p.repair_decision_written(5, R) == [SendCommit(3, 5)]
    assert p.phase(5) is Phase.COMMITTING and p.replicas(5) == (3,)


def test_a_waiting_repair_can_be_abandoned_but_not_one_being_written() -> None:
    p = CommitProtocol()
    p.recover(5, R, acked=list(R))
    p.begin_repair(5, [4], new=[4])
    p.repair_prepared(5, [4])
    assert p.repair_abandoned(5) == [SendAbort(4, 5)]
    assert p.end_written(5) == [] and not p.is_in_flight(5)
    q = CommitProtocol()
    q.begin_repair(9, [4], new=[4])
    q.repair_prepared(9, [4])
    assert q.repair_abandoned(9) == [], "its decision write decides"
    assert q.is_in_flight(9)
