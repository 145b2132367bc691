"""The coordinator's metadata on etcd (issue 10; docs/coordinator.md "Metadata on etcd").

`client` speaks etcd's v3 JSON gateway, `election` chooses the one leader and gives it its
fencing token, `mirror` makes etcd the durable copy of the coordinator's LMDB. One dfs
cluster's keys live under one root, by default `/dfs`: the election key and the metadata.
"""

from __future__ import annotations

DEFAULT_ROOT = "/dfs"


def leader_key(root: str = DEFAULT_ROOT) -> bytes:
    """The election key: its value is the leading coordinator's address."""
    return f"{root.rstrip('/')}/leader".encode()


def meta_prefix(root: str = DEFAULT_ROOT) -> str:
    """The prefix the sub-dbs are mirrored under (EtcdMirror, load)."""
    return f"{root.rstrip('/')}/meta"
