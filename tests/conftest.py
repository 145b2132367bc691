"""Shared fixtures: real clusters on loopback (tests/cluster.py), a module's etcd, a fresh
metadata store."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster
from etcd_harness import EtcdCluster
from meta_helpers import Sync, open_store

from dfs.meta import MetaStore


def pytest_sessionstart(session: pytest.Session) -> None:
    """A /dev/null that became a regular file (something renamed over it) hands every reader
    what was written there before: `git gc` then reads old log lines as revisions. Say so once
    instead of failing tests far away from the cause."""
    if not stat.S_ISCHR(os.stat(os.devnull).st_mode):
        raise pytest.UsageError(
            f"{os.devnull} is not a character device here (recreate it: "
            f"rm {os.devnull}; mknod -m 666 {os.devnull} c 1 3)")


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start clusters with custom settings: `cluster_factory(nodes=4, env={...})`."""
    started: list[Cluster] = []

    def start(**options: Any) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster-{len(started)}", **options)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop_all()


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    """A fresh coordinator and 3 nodes (R=3) for one test."""
    return cluster_factory()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for a whole module of tests that don't break it (they use distinct paths)."""
    cluster = Cluster(tmp_path_factory.mktemp("shared-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for a module of metadata-on-etcd tests (each keeps to its `prefix`)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """Each test its own keys in the shared etcd."""
    return f"/t/{request.node.name}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    """A fresh coordinator metadata store (LMDB) for the metadata unit tests."""
    s = open_store(tmp_path / "meta")
    yield s
    s.close()


@pytest.fixture
def ns(store: MetaStore) -> Sync:
    """The store's Namespace, each call one write transaction (meta_helpers.Sync)."""
    return Sync(store, store.namespace)
