"""Helpers of the tests of metadata on etcd (test_etcd_store, test_etcd_follower): etcd's copy
of the sub-dbs. Their fixtures (`etcd`: one etcd per module; `prefix`: each test its own keys
in it) are in conftest.py.
"""

from __future__ import annotations

from dfs.etcd.client import EtcdClient
from dfs.etcd.mirror import subdb_prefix
from dfs.meta import SUBDBS


def etcd_dump(client: EtcdClient, prefix: str) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every sub-db as etcd holds it, in the shape of meta_helpers.dump."""
    out = {}
    for name in SUBDBS:
        start = subdb_prefix(f"{prefix}/meta", name)
        out[name] = [(kv.key[len(start):], kv.value)
                     for kv in client.range(start, prefix=True).kvs]
    return out
