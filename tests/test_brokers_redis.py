"""k8s_celery.brokers.redis: the worker on a Redis broker that goes away and comes back."""

from __future__ import annotations

import time

import pytest

from conftest import running_pod_of

pytestmark = pytest.mark.cluster


def test_the_worker_rides_out_redis_restarts_with_tasks_in_flight(start_shim, taskapp, redis_server,
                                                                  k8s_cluster, k8s_namespace):
    # Celery 5.7 closes the broker connection it has just collected when the broker goes
    # away; with messages held unacknowledged (every task in flight here), closing the
    # collected channel raised AttributeError, an "Unrecoverable error": the worker exited.
    shim = start_shim()
    results = [taskapp.count.delay(f"redis-restart-{i}", 12) for i in range(4)]
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
