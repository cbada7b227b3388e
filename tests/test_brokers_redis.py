"""k8s_celery.brokers.redis: the worker on a Redis broker that goes away and comes back."""

from __future__ import annotations

import gc
import time

import pytest
from celery import Celery

from conftest import Shim, running_pod_of, write_manifest
from k8s_celery.testing.redis import RedisServer

pytestmark = pytest.mark.cluster


@pytest.fixture
def own_redis(monkeypatch):
    """A Redis of this test's own, which it restarts (the session's stays up for the others);
    Celery lets these variables override any app's broker and backend."""
    with RedisServer(persistence=True) as server:
        url = f"{server.url}/0"
        monkeypatch.setenv("CELERY_BROKER_URL", url)
        monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
        yield server, url


def test_the_worker_rides_out_redis_restarts_with_tasks_in_flight(own_redis, k8s_cluster, k8s_namespace,
                                                                  tmp_path):
    # Celery 5.7 closes the broker connection it has just collected when the broker goes
    # away; with messages held unacknowledged (every task in flight here), closing the
    # collected channel raised AttributeError, an "Unrecoverable error": the worker exited.
    redis_server, url = own_redis
    ride_out_restarts(redis_server, url, k8s_cluster, k8s_namespace, tmp_path)
    # Nothing the test made waits on its Redis once it is gone. Under Celery 5.5 a collected
    # AsyncResult unsubscribes again, retrying 20 times a second apart while its Redis is
    # away, in whichever thread the garbage collector runs: once the process kubelet's, whose
    # pods then stayed Pending past the next two tests' pending timeout (the CI's celery55).
    redis_server.stop()
    started = time.monotonic()
    gc.collect()
    assert time.monotonic() - started < 5


def ride_out_restarts(redis_server, url: str, k8s_cluster, k8s_namespace: str, tmp_path) -> None:
    manifests = tmp_path / "manifests"
    write_manifest(manifests, "kubernetes", url)
    producer = Celery("redis_restart", broker=url, backend=url, set_as_current=False)
    shim = Shim(k8s_cluster, k8s_namespace, manifests=manifests, log_dir=tmp_path, broker_url=url)
    try:
        shim.start(producer)
        results = [producer.send_task("taskapp.count", (f"redis-restart-{i}", 12), queue="kubernetes")
                   for i in range(4)]
        for result in results:  # the tasks have started: they need Redis again only at their end
            running_pod_of(k8s_cluster, k8s_namespace, result.id)
        time.sleep(1)
        for _ in range(3):
            redis_server.restart(downtime=1.0)
            time.sleep(1.5)
            assert shim.process.poll() is None, f"the worker exited:\n{shim.log()[-6000:]}"
        assert [result.get(timeout=120) for result in results] == [1, 1, 1, 1]
        assert "Unrecoverable error" not in shim.log()
        assert shim.process.poll() is None
    finally:
        shim.stop()
        # Collect the results (a promise makes each one a cycle) while their Redis is up.
        result = results = None
        gc.collect()
        producer.close()
