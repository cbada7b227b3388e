"""RabbitMQ-specific behaviour through the shim: consumer_timeout on a task that outlives it,
quorum queues, and Celery's native delayed delivery (Celery 5.5+)."""

from __future__ import annotations

import time

import pytest

from conftest import JobRecorder, jobs_in, running_pod_of
from k8s_celery.manifest import LABEL_QUEUE
from k8s_celery.testing import wait_until
from k8s_celery.testing.rabbitmq import RabbitMQServer

pytestmark = [pytest.mark.cluster, pytest.mark.rabbitmq]

CONSUMER_TIMEOUT_MS = 10_000
# How often a channel compares its oldest unacked delivery with consumer_timeout;
# RabbitMQ's default is 60000 ms (the close then comes up to a minute late).
TICK_MS = 1_000
QUORUM = {"RABBITAPP_QUEUE_TYPE": "quorum"}


@pytest.fixture(scope="module")
def short_timeout_rabbitmq():
    """A node of its own whose consumer_timeout (10 s) is shorter than the task under test."""
    with RabbitMQServer(consumer_timeout=CONSUMER_TIMEOUT_MS, channel_tick_interval=TICK_MS) as server:
        yield server


def settle(rabbit, queue: str = "kubernetes", timeout: float = 60) -> None:
    wait_until(lambda: rabbit.settled(queue), timeout=timeout,
               message=lambda: f"queue {queue} empty and every message acked: {rabbit.queue(queue)}")


def test_task_longer_than_consumer_timeout_runs_once(rabbit_setup, short_timeout_rabbitmq):
    """The README's promise: the channel closes, the message comes back, the running Job is
    adopted, the task runs once, and the worker goes on."""
    rabbit = rabbit_setup(server=short_timeout_rabbitmq)
    shim = rabbit.start_shim()
    with JobRecorder(rabbit.cluster, rabbit.namespace) as recorder:
        result = rabbit.app.count.delay("long", 16)
        assert result.get(timeout=120) == 1
        settle(rabbit)
    assert "has timed out waiting for delivery acknowledgement" in short_timeout_rabbitmq.log()
    assert rabbit.queue()["message_stats"]["redeliver"] >= 1, "the message was not delivered again"
    assert shim.process.poll() is None, f"the worker stopped:\n{shim.log()[-5000:]}"
    assert "PRECONDITION_FAILED - delivery acknowledgement" in shim.log()
    assert rabbit.starts("long") == 1 and rabbit.runs("long") == 1
    assert [len(names) for names in recorder.jobs.values()] == [1], recorder.jobs
    assert rabbit.app.add.delay(1, 1).get(timeout=60) == 2, "the worker must go on consuming"


def test_quorum_queue(rabbit_setup):
    rabbit = rabbit_setup(app_env=QUORUM)
    shim = rabbit.start_shim()
    assert rabbit.app.add.delay(4, 4).get(timeout=60) == 8
    result = rabbit.app.count.delay("quorum-evicted", 3)
    pod = running_pod_of(rabbit.cluster, rabbit.namespace, result.id)
    # Evict once the task body has begun: a pod evicted while Python starts never counts a start.
    wait_until(lambda: rabbit.starts("quorum-evicted") == 1, timeout=60, message="the first attempt started")
    rabbit.cluster.kubelet.evict(rabbit.namespace, pod["metadata"]["name"])
    assert result.get(timeout=90) == 1  # requeued by the quorum queue, run again to its end
    assert rabbit.starts("quorum-evicted") == 2
    settle(rabbit)
    assert rabbit.queue()["type"] == "quorum"
    assert "Global QoS is disabled" in shim.log()


def test_native_delayed_delivery_of_countdown_and_retry(rabbit_setup):
    """Celery 5.5+ sends countdown/eta tasks for quorum queues through RabbitMQ's delayed
    exchanges: the message reaches the queue (and the shim) only when it is due, by way of
    ``celery_delayed_delivery`` with a rewritten routing key, and still gets the Job
    manifest of the queue it was sent to."""
    rabbit = rabbit_setup(app_env=QUORUM)
    rabbit.write_manifest("kubernetes-big")
    shim = rabbit.start_shim(queues="kubernetes,kubernetes-big")
    sent = time.monotonic()
    delayed = rabbit.app.sleep.apply_async((3,), countdown=8, queue="kubernetes-big")
    time.sleep(3)
    inspect = rabbit.app.app.control.inspect(destination=[shim.hostname], timeout=5)
    assert inspect.scheduled() == {shim.hostname: []}, "the worker holds the message (no native delay)"
    assert rabbit.ready("kubernetes-big") == 0, "the message is not in the delayed queues"
    assert not jobs_in(rabbit.cluster, rabbit.namespace)
    pod = running_pod_of(rabbit.cluster, rabbit.namespace, delayed.id)
    assert time.monotonic() - sent >= 7.5
    job = next(j for j in jobs_in(rabbit.cluster, rabbit.namespace)
               if j["metadata"]["name"] == pod["metadata"]["labels"]["job-name"])
    assert job["metadata"]["labels"][LABEL_QUEUE] == "kubernetes-big"
    assert delayed.get(timeout=60) == 3
    # self.retry(countdown=1) on a quorum queue goes the same way
    assert rabbit.app.retry_once.delay("delayed-retry").get(timeout=90) == "retried"
    settle(rabbit, "kubernetes-big")
    settle(rabbit)
    exchanges = [e["name"] for e in rabbit.rabbit.api("GET", f"/api/exchanges/{rabbit.vhost}")]
    assert "celery_delayed_delivery" in exchanges and "celery_delayed_27" in exchanges
