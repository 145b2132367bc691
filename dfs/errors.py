"""One error vocabulary for the wire, the CLI and the mount."""

from __future__ import annotations

import enum
import errno


class Code(enum.StrEnum):
    ENOENT = "ENOENT"
    EEXIST = "EEXIST"
    ENOTEMPTY = "ENOTEMPTY"
    ENOTDIR = "ENOTDIR"
    EISDIR = "EISDIR"
    EINVAL = "EINVAL"
    ENAMETOOLONG = "ENAMETOOLONG"
    ENOSPC = "ENOSPC"
    EPERM = "EPERM"
    ENODATA = "ENODATA"
    ESTALE = "ESTALE"
    EROFS = "EROFS"  # a snapshot (or a file's kept version) is read-only
    CONFLICT = "CONFLICT"
    UNAVAILABLE = "UNAVAILABLE"
    BAD_REQUEST = "BAD_REQUEST"
    AUTH = "AUTH"
    CHECKSUM = "CHECKSUM"
    TOO_BIG = "TOO_BIG"
    INTERNAL = "INTERNAL"
    # A standby coordinator refused the request unexecuted; the reply's `leader` names the
    # leader's address (nil while an election runs). Clients follow it, never show it.
    NOT_LEADER = "NOT_LEADER"


ERRNO: dict[Code, int] = {
    Code.ENOENT: errno.ENOENT,
    Code.EEXIST: errno.EEXIST,
    Code.ENOTEMPTY: errno.ENOTEMPTY,
    Code.ENOTDIR: errno.ENOTDIR,
    Code.EISDIR: errno.EISDIR,
    Code.EINVAL: errno.EINVAL,
    Code.ENAMETOOLONG: errno.ENAMETOOLONG,
    Code.ENOSPC: errno.ENOSPC,
    Code.EPERM: errno.EPERM,
    Code.ENODATA: errno.ENODATA,
    Code.ESTALE: errno.ESTALE,
    Code.EROFS: errno.EROFS,
    Code.CONFLICT: errno.EBUSY,
    Code.UNAVAILABLE: errno.EIO,
    Code.BAD_REQUEST: errno.EINVAL,
    Code.AUTH: errno.EACCES,
    Code.CHECKSUM: errno.EIO,
    Code.TOO_BIG: errno.EFBIG,
    Code.INTERNAL: errno.EIO,
    Code.NOT_LEADER: errno.EIO,
}


class DfsError(Exception):
    """An error with a wire code; what every layer raises and every boundary converts."""

    def __init__(self, code: Code | str, msg: str = "", **details: object) -> None:
        self.details = details
        try:
            self.code = Code(code)
        except ValueError:
            self.code = Code.INTERNAL
        self.msg = msg or self.code.value
        super().__init__(f"{self.code.value}: {self.msg}")

    @property
    def errno(self) -> int:
        return ERRNO[self.code]

    def to_reply(self) -> dict:
        return {**self.details, "ok": False, "error": self.code.value, "msg": self.msg}


class InDoubt(DfsError):
    """A change the server cannot tell landed or not: the reply of its durable write (an etcd
    txn) was lost. Answering it with an error would tell the client it failed when it may have
    landed, so the request gets no reply at all (its connection is closed, as if the server
    had crashed) and the server stops deciding (the HA leader steps down): the client settles
    it as a lost reply, with whoever leads next, which reads the truth from etcd."""


def raise_for_reply(reply: dict) -> dict:
    """Return a successful reply unchanged, raise DfsError for an error reply."""
    if reply.get("ok"):
        return reply
    details = {k: v for k, v in reply.items() if k not in ("ok", "error", "msg", "id")}
    raise DfsError(reply.get("error", "INTERNAL"), str(reply.get("msg", "")), **details)


def not_leader(leader: str | None) -> DfsError:
    """The refusal of a coordinator that does not lead: nothing was executed, so the caller
    may resend the request, to `leader` if one is known."""
    where = f"the leader is {leader}" if leader else "no leader is known (an election runs)"
    return DfsError(Code.NOT_LEADER, f"not the leader: {where}", leader=leader or None)


def leader_of(error: DfsError) -> str | None:
    """The leader address a NOT_LEADER error names, if any."""
    leader = error.details.get("leader")
    return leader if isinstance(leader, str) and leader else None
