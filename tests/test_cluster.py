"""The Kubernetes client layer: retry policy and the list+watch, against the real API server."""

from __future__ import annotations

import logging
import threading

import pytest

from k8s_celery.cluster import ApiError, KubeApi, RetryPolicy, collection_path, load_configuration
from k8s_celery.watch import Watcher
from k8s_celery.testing import wait_until
from k8s_celery.testing.server import free_port


def test_transient_and_client_errors():
    assert ApiError(503, "ServiceUnavailable").retryable and ApiError(429, "TooManyRequests").retryable
    assert ApiError(0, "ConnectionError").retryable
    assert not ApiError(403, "Forbidden").retryable and not ApiError(422, "Invalid").retryable


def test_the_bearer_token_is_asked_of_the_configuration_at_most_every_auth_ttl(monkeypatch):
    from kubernetes import client as k8s_client

    from k8s_celery import cluster

    tokens = iter(["Bearer one", "Bearer two"])
    asked = []

    def refresh(configuration):  # as the client's own hook: a rotated or expired token
        asked.append(1)
        configuration.api_key["BearerToken"] = next(tokens)

    configuration = k8s_client.Configuration(host="https://127.0.0.1:6443", api_key={"BearerToken": "Bearer zero"})
    configuration.refresh_api_key_hook = refresh
    monkeypatch.setattr(cluster, "AUTH_TTL", 0.2)
    api = KubeApi(configuration)
    assert {api._headers()["Authorization"] for _ in range(100)} == {"Bearer one"}
    assert len(asked) == 1
    wait_until(lambda: api._headers()["Authorization"] == "Bearer two", timeout=5)
    assert len(asked) == 2


@pytest.mark.cluster
def test_client_errors_are_not_retried(k8s_cluster, k8s_namespace, caplog):
    api = KubeApi(load_configuration(str(k8s_cluster.kubeconfig), in_cluster=False),
                  retry=RetryPolicy(attempts=5, initial_wait=0.01))
    with caplog.at_level(logging.WARNING), pytest.raises(ApiError) as raised:
        api.get(f"{collection_path('configmaps', k8s_namespace)}/missing")
    assert raised.value.not_found and "retry" not in caplog.text


@pytest.mark.cluster
def test_connection_errors_are_retried_with_backoff(k8s_cluster, caplog):
    configuration = load_configuration(str(k8s_cluster.kubeconfig), in_cluster=False)
    configuration.host = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    api = KubeApi(configuration, retry=RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05))
    with caplog.at_level(logging.WARNING), pytest.raises(ApiError) as raised:
        api.get("/version")
    assert raised.value.status == 0
    assert caplog.text.count("Kubernetes API call failed") == 2


@pytest.mark.cluster
def test_watch_survives_an_api_server_restart_and_410(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    seen: list[str] = []
    synced: list[int] = []
    added = threading.Event()

    def on_event(kind, obj):
        seen.append(obj["metadata"]["name"])
        added.set()
    watcher = Watcher(KubeApi(load_configuration(str(k8s_cluster.kubeconfig), in_cluster=False)),
                      collection_path("configmaps", k8s_namespace), on_event,
                      on_sync=lambda objects: synced.append(len(objects)), read_timeout=5).start()
    try:
        assert watcher.wait_synced(30)
        api.create(collection_path("configmaps", k8s_namespace), {"metadata": {"name": "before"}})
        wait_until(lambda: "before" in seen, message="the first event")
        for index in range(3):  # history the compaction will drop
            api.create(collection_path("configmaps", k8s_namespace), {"metadata": {"name": f"c{index}"}})
        wait_until(lambda: "c2" in seen, message="the events")
        k8s_cluster.processes["kube-apiserver"].stop(timeout=3)
        k8s_cluster.compact_etcd()
        k8s_cluster.processes["kube-apiserver"].start()
        k8s_cluster.wait_ready()
        api.create(collection_path("configmaps", k8s_namespace), {"metadata": {"name": "after"}})
        wait_until(lambda: "after" in seen or watcher.relists > 1 and synced[-1] >= 5, timeout=60,
                   message="the object created after the restart")
        assert watcher.relists >= 1
    finally:
        watcher.stop()


def test_rate_limiter_bounds_the_request_rate():
    import time

    from k8s_celery.cluster import RateLimiter

    limiter = RateLimiter(qps=100, burst=5)
    started = time.monotonic()
    for _ in range(25):
        limiter.acquire()
    assert time.monotonic() - started >= 0.18  # 20 requests beyond the burst at 100/s


@pytest.mark.cluster
def test_watch_resumes_where_it_got_after_a_quiet_timeout(k8s_cluster, k8s_namespace):
    """A watch that reads nothing for ``read_timeout`` is opened again from the last
    resourceVersion it saw, not from the list's: no event is delivered twice."""
    api = k8s_cluster.api
    events: list[tuple[str, str]] = []
    watcher = Watcher(KubeApi(load_configuration(str(k8s_cluster.kubeconfig), in_cluster=False)),
                      collection_path("configmaps", k8s_namespace),
                      lambda kind, obj: events.append((kind, obj["metadata"]["name"])), read_timeout=1).start()
    try:
        assert watcher.wait_synced(30)
        for index in range(3):
            api.create(collection_path("configmaps", k8s_namespace), {"metadata": {"name": f"q{index}"}})
        wait_until(lambda: ("ADDED", "q2") in events, message="the events")
        wait_until(lambda: watcher.restarts >= 2, timeout=30, message="two quiet timeouts")
        api.create(collection_path("configmaps", k8s_namespace), {"metadata": {"name": "q3"}})
        wait_until(lambda: ("ADDED", "q3") in events, message="the event after the timeouts")
        assert [name for kind, name in events if kind == "ADDED"] == ["q0", "q1", "q2", "q3"]
    finally:
        watcher.stop()


@pytest.mark.cluster
def test_watch_relists_every_resync_period(k8s_cluster, k8s_namespace):
    """The periodic relist happens while a watch is open and quiet (the server ends the
    watch by the resync deadline)."""
    watcher = Watcher(KubeApi(load_configuration(str(k8s_cluster.kubeconfig), in_cluster=False)),
                      collection_path("configmaps", k8s_namespace), lambda kind, obj: None,
                      resync_period=1).start()
    try:
        assert watcher.wait_synced(30)
        wait_until(lambda: watcher.relists >= 4, timeout=15, message="a relist every second")
    finally:
        watcher.stop()
