"""End to end with RabbitMQ as broker (a real rabbitmq-server) and Redis as result backend:
the core behaviours of the README's failure table, on AMQP instead of kombu's Redis transport."""

from __future__ import annotations

import signal

import pytest

from conftest import APPS, JobRecorder, jobs_in, running_pod_of
from flower_process import Flower
from k8s_celery.testing import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.rabbitmq]


def settle(rabbit, timeout: float = 60) -> None:
    wait_until(lambda: rabbit.settled(), timeout=timeout,
               message=lambda: f"the queue to be empty and every message acked: {rabbit.queue()}")


def test_success_and_failure(rabbit):
    shim = rabbit.start_shim()
    app = rabbit.app
    ok, bad = app.add.delay(2, 3), app.fail.delay("boom")
    assert ok.get(timeout=60) == 5
    with pytest.raises(ValueError, match="boom"):
        bad.get(timeout=60)
    assert bad.state == "FAILURE" and "raise ValueError(message)" in bad.traceback
    settle(rabbit)
    wait_until(lambda: rabbit.queue().get("consumers") == 1, timeout=10,
               message=lambda: f"the shim as the queue's one consumer: {rabbit.queue()}")
    assert rabbit.queue()["arguments"] == {}
    assert "Connected to amqp://guest:**@127.0.0.1" in shim.log()


def test_retry_runs_again(rabbit):
    rabbit.start_shim()
    result = rabbit.app.retry_once.delay("r1")
    assert result.get(timeout=90) == "retried"
    assert int(rabbit.app.store().get("attempts:r1")) == 2
    settle(rabbit)


def test_chord(rabbit):
    from celery import chain, chord

    rabbit.start_shim(max_jobs=6)
    app = rabbit.app
    assert chain(app.add.s(1, 2), app.add.s(3)).delay().get(timeout=120) == 6
    assert chord([app.add.s(i, i) for i in range(4)])(app.tsum.s()).get(timeout=120) == 12
    settle(rabbit)


def test_evicted_pod_is_requeued_by_the_broker_and_runs_again(rabbit):
    shim = rabbit.start_shim()
    result = rabbit.app.count.delay("evicted", 3)
    pod = running_pod_of(rabbit.cluster, rabbit.namespace, result.id)
    # Evict once the task body has begun: a pod evicted while Python starts never counts a start.
    wait_until(lambda: rabbit.starts("evicted") == 1, timeout=60, message="the first attempt started")
    rabbit.cluster.kubelet.evict(rabbit.namespace, pod["metadata"]["name"])
    assert result.get(timeout=90) == 1  # only the second attempt ran to its end
    assert rabbit.starts("evicted") == 2
    assert "lost (pod Evicted" in shim.log()
    settle(rabbit)


def test_sigkilled_worker_redelivery_is_adopted_without_a_second_job(rabbit):
    first = rabbit.start_shim(max_jobs=10)
    with JobRecorder(rabbit.cluster, rabbit.namespace) as recorder:
        results = [rabbit.app.count.delay(f"k{i}", 8) for i in range(10)]
        wait_until(lambda: len(jobs_in(rabbit.cluster, rabbit.namespace)) == 10, timeout=60,
                   message="10 Jobs")
        first.kill(signal.SIGKILL)
        # RabbitMQ sees the connection close and requeues the unacked messages at once
        # (no visibility timeout): they wait, marked redelivered, for the next consumer.
        wait_until(lambda: rabbit.queue().get("messages_ready") == 10, timeout=30,
                   message=lambda: f"10 messages requeued: {rabbit.queue()}")
        second = rabbit.start_shim(max_jobs=10)
        assert [r.get(timeout=120) for r in results] == [1] * 10
        settle(rabbit, timeout=90)
    assert [rabbit.starts(f"k{i}") for i in range(10)] == [1] * 10
    assert all(len(names) == 1 for names in recorder.jobs.values()), recorder.jobs
    log = second.log()
    assert log.count("adopting running Job") + log.count("already ran in Job") == 10, log


def test_revoke_terminate_deletes_the_job(rabbit):
    rabbit.start_shim()
    result = rabbit.app.sleep.delay(60)
    running_pod_of(rabbit.cluster, rabbit.namespace, result.id)
    result.revoke(terminate=True)
    wait_until(lambda: not jobs_in(rabbit.cluster, rabbit.namespace), timeout=30, message="Job deletion")
    wait_until(lambda: result.state == "REVOKED", timeout=30, message="REVOKED state")
    settle(rabbit)


def test_flower_task_view(rabbit, tmp_path):
    with Flower("rabbitapp", {**rabbit.env, "PYTHONPATH": str(APPS)}, tmp_path / "flower.log",
                args=(f"--broker_api={rabbit.rabbit.management_url.replace('//', '//guest:guest@')}/api/",)
                ) as flower:
        shim = rabbit.start_shim(max_jobs=4)
        worker = wait_until(lambda: flower.workers().get(shim.hostname), timeout=60,
                            message="the shim in flower")
        assert worker["stats"]["pool"]["implementation"] == "k8s_celery.pool:KubernetesPool"
        assert worker["stats"]["broker"]["transport"] == "amqp"
        ok, bad = rabbit.app.add.delay(20, 22), rabbit.app.fail.delay("for flower")
        assert ok.get(timeout=60) == 42
        with pytest.raises(ValueError):
            bad.get(timeout=60)
        done = flower.wait_for_state(ok.id, "SUCCESS")
        assert done["result"] == "42" and done["worker"] == shim.hostname
        assert done["received"] and done["started"] and done["runtime"] is not None
        failed = flower.wait_for_state(bad.id, "FAILURE")
        assert "ValueError" in failed["exception"] and "raise ValueError" in failed["traceback"]
        page = flower.page(f"/task/{bad.id}")
        assert "for flower" in page and shim.hostname in page
        # From RabbitMQ's management API, whose queue statistics appear (and change) every few seconds.
        def queue_length():
            lengths = flower.get("/api/queues/length")["active_queues"]
            return [q.get("messages") for q in lengths if q["name"] == "kubernetes"]

        wait_until(lambda: queue_length() == [0], timeout=30, message="the kubernetes queue empty in Flower")
