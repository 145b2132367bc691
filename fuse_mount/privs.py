"""Set-ID bits on write: what Linux's file_remove_privs does, done by the mount.

A write, a truncate or a chown by a process without CAP_FSETID drops a regular file's
set-user-ID bit, and its set-group-ID bit when group-execute is set. For truncate and chown
the kernel does it itself (it sends the mode change with the setattr, as before a write
through the page cache), but a FUSE write with direct_io, and an open with O_TRUNC (atomic_o_trunc), reach us with no mode change, so
the mount asks the coordinator (`setattr kill_suid`) at the first such write of a handle.

A write request carries no caller, so the handle judges by its opener (pid and uid at open);
its capabilities come from /proc, read only when the file has set-ID bits to lose.
"""

from __future__ import annotations

import stat

CAP_FSETID = 4


def dropped(mode: int) -> int:
    """mode after an unprivileged write: the rule `setattr kill_suid` applies on the
    coordinator (dfs/meta/attrs.py), for a file the coordinator no longer has."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def would_drop(mode: int) -> bool:
    """Whether an unprivileged write changes this mode (only regular files lose bits)."""
    return stat.S_ISREG(mode) and dropped(mode) != mode


def has_fsetid(pid: int, uid: int) -> bool:
    """Whether process `pid` holds CAP_FSETID; if it is gone (or /proc unreadable), whether
    `uid` is root, which is what a process that never dropped capabilities has."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return uid == 0
