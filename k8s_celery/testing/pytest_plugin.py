"""pytest fixtures: a session-wide local cluster and Redis, a fresh namespace per test."""

from __future__ import annotations

import re
import secrets

import pytest


@pytest.fixture(scope="session")
def k8s_cluster():
    """A :class:`~k8s_celery.testing.LocalCluster` shared by the whole test session."""
    from .cluster import LocalCluster

    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def k8s_namespace(k8s_cluster, request):
    """A new namespace for one test, deleted (with everything in it) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = k8s_cluster.create_namespace(f"{base}-{secrets.token_hex(3)}")
    yield name
    k8s_cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def redis_server():
    """A real ``redis-server`` on a free port, with persistence, for the session."""
    from .redis import RedisServer

    with RedisServer() as server:
        yield server
