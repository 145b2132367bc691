"""The coordinator's 2PC state machine, driven by hand: no sockets, no clock, no disk."""

from dfs.errors import Code
from dfs.twopc import (
    CommitProtocol,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendCommit,
    SendPrepare,
    WriteDecision,
    WriteEnd,
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
