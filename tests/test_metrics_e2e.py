"""The worker's Prometheus endpoint, scraped during an end-to-end run."""

from __future__ import annotations

import pytest
import urllib3

from conftest import scrape_settled
from k8s_celery.testing import wait_until
from k8s_celery.testing.server import free_port

pytestmark = pytest.mark.cluster


def test_metrics_count_the_run(start_shim, taskapp):
    port = free_port()
    start_shim(env={"K8S_CELERY_METRICS_PORT": str(port)})
    assert [taskapp.add.delay(i, i).get(timeout=60) for i in range(3)] == [0, 2, 4]
    with pytest.raises(ValueError):
        taskapp.fail.delay("metrics").get(timeout=60)
    samples = scrape_settled(port, acks=4)
    add = (("queue", "kubernetes"), ("task", "taskapp.add"))
    assert samples[("k8s_celery_jobs_launched_total", add)] == 3
    assert samples[("k8s_celery_task_outcomes_total", tuple(sorted(add + (("outcome", "succeeded"),))))] == 3
    fail = (("outcome", "failed"), ("queue", "kubernetes"), ("task", "taskapp.fail"))
    assert samples[("k8s_celery_task_outcomes_total", fail)] == 1
    assert samples[("k8s_celery_launch_seconds_count", ())] == 4
    assert samples[("k8s_celery_ack_seconds_count", ())] == 4
    assert 0 < samples[("k8s_celery_ack_seconds_sum", ())] < 4 * 5
    assert samples[("k8s_celery_jobs_in_flight", ())] == 0


def probe(port: int, path: str) -> tuple[int, str]:
    answer = urllib3.PoolManager().request("GET", f"http://127.0.0.1:{port}{path}", timeout=5, retries=False)
    return answer.status, answer.data.decode()


def test_liveness_fails_when_the_consumer_is_stuck(start_shim, taskapp):
    port = free_port()
    shim = start_shim(env={"K8S_CELERY_METRICS_PORT": str(port), "K8S_CELERY_LIVENESS_TIMEOUT": "2"})
    assert probe(port, "/healthz")[0] == 200 and probe(port, "/readyz")[0] == 200
    # A remote-control command runs on the worker's event loop: this one holds it, as a
    # consumer blocked on a call that never returns. The process and its HTTP thread live on.
    taskapp.app.control.broadcast("block_event_loop", arguments={"seconds": 8},
                                  destination=[shim.hostname])
    status, body = wait_until(lambda: (lambda a: a if a[0] == 503 else None)(probe(port, "/healthz")),
                              timeout=10, interval=0.2, message="liveness to fail")
    assert "event loop silent" in body
    assert probe(port, "/readyz")[0] == 503
    # Once the loop turns again the worker is alive and consumes as before.
    wait_until(lambda: probe(port, "/healthz")[0] == 200, timeout=20, interval=0.2, message="liveness back")
    assert taskapp.add.delay(2, 3).get(timeout=60) == 5
