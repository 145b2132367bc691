"""The multi-file half of the 2PC machine, driven by hand: one decision for every member."""

from dfs.errors import Code
from dfs.twopc import (
    CommitProtocol,
    MemberCommit,
    Phase,
    ReplyError,
    ReplyOk,
    SendAbort,
    SendCommit,
    SendPrepare,
    WriteEnd,
    WriteGroupDecision,
)

CK = b"\x01" * 16
PLACES = {11: (1, 2, 3), 12: (2, 3, 4), 13: (4, 5, 6)}
GID = 99


def started() -> CommitProtocol:
    p = CommitProtocol()
    for txid, replicas in PLACES.items():
        assert p.begin(txid, replicas) == []
    return p


def members(voted: bool = False) -> list[MemberCommit]:
    return [MemberCommit(t, 10, CK, 1, r if voted else ()) for t, r in PLACES.items()]


def test_one_decision_after_every_member_voted_then_commit_to_the_union() -> None:
    p = started()
    actions = p.request_group_commit(GID, members())
    assert actions == [SendPrepare(n, t, 10, CK, 1) for t, r in PLACES.items() for n in r]
    for t, r in PLACES.items():
        for n in r:
            out = p.vote(t, n, True)
            last = t == 13 and n == 6
            assert out == ([WriteGroupDecision(GID, (11, 12, 13))] if last else []), (t, n)
    assert all(p.is_in_flight(t) for t in PLACES), "undecided until the write is durable"
    out = p.group_decision_written(GID)
    assert out == [ReplyOk(GID), *(SendCommit(n, t) for t, r in PLACES.items() for n in r)]
    assert all(p.is_committed(t) for t in PLACES)
    # After the decision each member ends on its own replicas' acks, as a single write does.
    for n in PLACES[11]:
        out = p.commit_acked(11, n)
    assert out == [WriteEnd(11)]
    assert p.phase(12) is Phase.COMMITTING


def test_a_member_voted_in_its_stage_goes_straight_to_the_decision() -> None:
    p = started()
    assert p.request_group_commit(GID, members(voted=True)) == [
        WriteGroupDecision(GID, (11, 12, 13))]
    assert p.request_group_commit(GID, members(voted=True)) == [], "a duplicate changes nothing"


def test_one_no_on_one_member_aborts_every_member_on_every_replica() -> None:
    p = started()
    p.request_group_commit(GID, members())
    p.vote(11, 1, True)
    out = p.vote(13, 5, False, Code.ENOSPC, "full")
    aborts = [a for a in out if isinstance(a, SendAbort)]
    assert sorted((a.txid, a.node) for a in aborts) == sorted(
        (t, n) for t, r in PLACES.items() for n in r)
    error = out[-1]
    assert isinstance(error, ReplyError) and error.txid == GID
    assert error.code is Code.ENOSPC and error.failed == (5,) and "13" in error.msg
    assert all(p.phase(t) is None for t in PLACES)
    assert p.vote(12, 2, True) == [], "a late vote changes nothing"


def test_a_vote_timeout_on_one_member_aborts_all() -> None:
    p = started()
    p.request_group_commit(GID, members())
    out = p.vote_timeout(12)
    assert isinstance(out[-1], ReplyError) and out[-1].txid == GID
    assert len([a for a in out if isinstance(a, SendAbort)]) == 9
    assert p.group_phase(GID) is None


def test_a_refused_decision_aborts_all() -> None:
    p = started()
    p.request_group_commit(GID, members(voted=True))
    out = p.group_decision_refused(GID, Code.CONFLICT, "/b is at version 3")
    assert out[-1] == ReplyError(GID, Code.CONFLICT, "/b is at version 3", ())
    assert all(p.phase(t) is None for t in PLACES)


def test_an_unknown_member_aborts_the_others() -> None:
    p = started()
    out = p.request_group_commit(GID, [*members(), MemberCommit(77, 1, CK, 1)])
    assert isinstance(out[-1], ReplyError) and "77" in out[-1].msg
    assert all(p.phase(t) is None for t in PLACES)


def test_a_member_cannot_be_committed_alone_or_aborted_once_in_a_group() -> None:
    p = started()
    p.request_group_commit(GID, members())
    assert p.request_commit(11, 10, CK, 1) == []
    assert p.abort(11) == []
    assert p.phase(11) is Phase.PREPARING


def test_a_group_of_namespace_operations_only_decides_at_once() -> None:
    p = CommitProtocol()
    assert p.request_group_commit(GID, []) == [WriteGroupDecision(GID, ())]
    assert p.group_decision_written(GID) == [ReplyOk(GID)]
