"""The pool's pure logic: queue resolution, in-flight limits, outcome -> exception mapping."""

from __future__ import annotations

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.exceptions import Reject, Retry

from k8s_celery import outcome as o
from k8s_celery.pool import InFlight, KubernetesPool, exception_info


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setenv("K8S_CELERY_MAX_LOST_ATTEMPTS", "3")
    app = Celery("unit", broker="memory://", backend="cache+memory://")
    app.conf.task_queues = None
    app.amqp.queues.select(["kubernetes", "other"])
    return KubernetesPool(limit=2, app=app)


def apply(pool, task_id: str, routing_key: str = "kubernetes") -> InFlight:
    return pool.on_apply(None, args=("proj.add", task_id, {"delivery_info": {"routing_key": routing_key}},
                                     b"[]", "application/json", "utf-8"), callback=lambda r: None)


def test_queue_is_taken_from_the_routing_key(pool):
    assert pool.consumed_queues() == ["kubernetes", "other"]
    assert apply(pool, "a").spec.queue == "kubernetes"
    assert apply(pool, "b", routing_key="other").spec.queue == "other"


def test_deliveries_beyond_the_limit_wait_in_order(pool):
    entries = [apply(pool, f"t{i}") for i in range(4)]
    assert pool._active == 2 and [e.task_id for e in pool._waiting] == ["t2", "t3"]
    pool.grow(1)
    assert pool._active == 3 and [e.task_id for e in pool._waiting] == ["t3"]
    pool.shrink(5)
    assert pool.limit == 1
    info = pool._get_info()
    assert info["max-concurrency"] == 1 and info["queued"] == 1 and len(info["jobs"]) == 4
    assert entries[0].info()["phase"] == "Queued"


def test_a_second_delivery_joins_the_first(pool):
    first = apply(pool, "same")
    second = apply(pool, "same")
    assert second is first and len(first.deliveries) == 2 and pool._active == 1


def test_task_exceptions_are_rebuilt(pool):
    failure = o.Outcome(o.FAILURE, exc_type="ValueError", exc_module="builtins", exc_args=["bad"])
    exc = pool._task_exception(failure)
    assert type(exc) is ValueError and exc.args == ("bad",)
    retry = pool._task_exception(o.Outcome(o.RETRY, result="again", exc_type="KeyError",
                                           exc_module="builtins", exc_args=["k"]))
    assert isinstance(retry, Retry) and isinstance(retry.exc, KeyError)
    reject = pool._task_exception(o.Outcome(o.REJECTED, requeue=True))
    assert isinstance(reject, Reject) and reject.requeue is True
    unknown = pool._task_exception(o.Outcome(o.FAILURE, exc_type="Gone", exc_module="no.such.module",
                                             exc_args=["x"]))
    assert type(unknown).__name__ == "Gone"


def test_exception_info_carries_the_pods_traceback():
    einfo = exception_info(WorkerLostError("lost"), "Traceback from the pod")
    assert type(einfo.exception) is WorkerLostError and einfo.traceback == "Traceback from the pod"


def test_lost_attempts_end_in_failure_at_the_limit(pool):
    entry = apply(pool, "lost")
    lost = o.Outcome(o.LOST, reason="evicted")
    entry.lost_before = 1
    assert not pool._final_loss(entry, lost)
    entry.lost_before = 2
    assert pool._final_loss(entry, lost)
    entry.lost_before = 3  # found already exhausted at launch
    assert pool._final_loss(entry, lost)


def test_rabbitmq_consumer_timeout_is_checked_at_start(monkeypatch):
    from kombu import Queue

    from k8s_celery.pool import broker_warnings

    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)  # it would win over the argument
    app = Celery("rabbit", broker="amqp://guest@localhost//")
    app.conf.task_queues = [Queue("kubernetes", queue_arguments={"x-consumer-timeout": 7200000}),
                            Queue("plain")]
    app.amqp.queues.select(["kubernetes", "plain"])
    warnings = broker_warnings(app)
    assert "queue kubernetes: x-consumer-timeout is 7200000 ms" in warnings[0]
    assert "queues plain set no x-consumer-timeout" in warnings[1]
    assert broker_warnings(Celery("redis", broker="redis://localhost")) == []
