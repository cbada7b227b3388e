"""pytest fixtures: a session-wide local cluster (process kubelet, or a real node), Redis,
RabbitMQ and PostgreSQL, a fresh namespace per test.

A test that needs what this machine lacks (a Debian package, root, cgroups, Go) fails with
the one line of its :class:`~k8s_celery.testing.requirements.MissingRequirement`: what is
missing and how to get it, no traceback. It is never skipped.
"""

from __future__ import annotations

import gc
import re
import secrets

import pytest

from .requirements import MissingRequirement


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.excinfo.errisinstance(MissingRequirement):
        call.excinfo = _failure(str(call.excinfo.value))
    return (yield)


def _failure(message: str) -> pytest.ExceptionInfo:
    try:
        pytest.fail(message, pytrace=False)
    except pytest.fail.Exception:
        return pytest.ExceptionInfo.from_current()


@pytest.fixture(scope="session")
def k8s_cluster():
    """A :class:`~k8s_celery.testing.LocalCluster` shared by the whole test session."""
    from .cluster import LocalCluster

    with LocalCluster() as cluster:
        yield cluster


#: The Kueue of :func:`k8s_kueue_cluster`: an admitted Workload whose pods are not ready
#: within 15 s is evicted and queued again after about a second, and deactivated at its
#: second such eviction (its requeue limit).
KUEUE_SETTINGS = {"waitForPodsReady": {"timeout": "15s", "blockAdmission": False, "requeuingStrategy": {
    "backoffLimitCount": 1, "backoffBaseSeconds": 1, "backoffMaxSeconds": 2}}}


@pytest.fixture(scope="session")
def k8s_kueue_cluster():
    """A second LocalCluster running Kueue's manager and webhooks (:data:`KUEUE_SETTINGS`),
    shared by the session: Kueue's webhook sees every Job created, so the others' cluster
    stays without it."""
    from .cluster import LocalCluster

    with LocalCluster(kueue=KUEUE_SETTINGS) as cluster:
        yield cluster


def namespace_name(request) -> str:
    """A fresh namespace name derived from the test's name."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"{base}-{secrets.token_hex(3)}"


@pytest.fixture
def k8s_namespace(k8s_cluster, request):
    """A new namespace for one test, deleted (with everything in it) afterwards."""
    name = k8s_cluster.create_namespace(namespace_name(request))
    yield name
    k8s_cluster.delete_namespace(name)


class RealNodeSession:
    """The session's cluster with a real node: started on first use, stoppable in between.

    Only one real node runs on a machine at a time, so a test that needs a cluster of its
    own calls :meth:`stop` first; the next :meth:`get` starts a new one.
    """

    def __init__(self, **options):
        self.options = options
        self.cluster = None

    def get(self):
        if self.cluster is None:
            from .cluster import LocalCluster

            self.cluster = LocalCluster(node="real", **self.options).start()
        return self.cluster

    def stop(self) -> dict[str, list[str]]:
        """Stop the cluster (if any); what it left on the machine (empty when clean)."""
        if self.cluster is None:
            return {}
        cluster, self.cluster = self.cluster, None
        cluster.stop()
        return cluster.real_node.leftovers()


@pytest.fixture(scope="session")
def k8s_real_node_session():
    """The :class:`RealNodeSession` of the test session (needs root; see ``realnode``)."""
    session = RealNodeSession()
    yield session
    session.stop()


@pytest.fixture
def k8s_real_cluster(k8s_real_node_session):
    """A :class:`~k8s_celery.testing.LocalCluster` with a real node (kubelet, containerd,
    runc, kube-proxy, kube-scheduler), shared by the session."""
    return k8s_real_node_session.get()


@pytest.fixture
def k8s_real_namespace(k8s_real_cluster, request):
    """A new namespace on the real-node cluster for one test, deleted afterwards."""
    name = k8s_real_cluster.create_namespace(namespace_name(request))
    yield name
    k8s_real_cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def redis_server():
    """A real ``redis-server`` on a free port, with persistence, for the session."""
    from .redis import RedisServer

    with RedisServer() as server:
        yield server
        # Results the tests left in reference cycles unsubscribe from Redis when collected:
        # collect them while Redis is up. pytest collects at exit, when Celery's Redis backend
        # (5.5 and 5.6) would retry reconnecting for about 20 s per result.
        gc.collect()


@pytest.fixture(scope="session")
def rabbitmq_server():
    """A real, isolated ``rabbitmq-server`` node (with the management API) for the session.

    Tests get their own virtual host from it (see :meth:`RabbitMQServer.add_vhost`)."""
    from .rabbitmq import RabbitMQServer

    with RabbitMQServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (its own ``initdb`` and data directory) for the session."""
    from .postgres import PostgresServer

    with PostgresServer() as server:
        yield server
