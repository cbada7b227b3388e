"""The pool's Celery interface, without a cluster: deliveries, slots, revoke versus cancel."""

from __future__ import annotations

import pytest
from celery import Celery

from k8s_celery.deliveries import Phase
from k8s_celery.pool import KubernetesPool, _is_revocation


class Queue:
    """Stands in for the work queue: records the keys the pool hands it."""

    def __init__(self):
        self.keys: list[str] = []

    def add(self, key):
        self.keys.append(key)


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setenv("K8S_CELERY_MAX_LOST_ATTEMPTS", "3")
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("unit", broker="memory://", backend="cache+memory://")
    app.conf.task_queues = None
    app.amqp.queues.select(["kubernetes", "other"])
    pool = KubernetesPool(limit=2, app=app, timeout=30, soft_timeout=20)
    pool.queue = Queue()
    return pool


def apply(pool, task_id: str, routing_key: str = "kubernetes", retries: int = 0, **callbacks):
    request = {"id": task_id, "retries": retries, "delivery_info": {"routing_key": routing_key}}
    return pool.on_apply(None, args=("proj.add", task_id, request, b"[]", "application/json", "utf-8"),
                         callback=lambda r: None, **callbacks)


def test_queue_is_taken_from_the_routing_key(pool):
    assert pool.consumed_queues() == ["kubernetes", "other"]
    assert apply(pool, "a").spec.queue == "kubernetes"
    assert apply(pool, "b", routing_key="other").spec.queue == "other"


def test_worker_time_limits_are_the_defaults(pool):
    spec = apply(pool, "a").spec
    assert (spec.time_limit, spec.soft_time_limit) == (30, 20)


def test_deliveries_beyond_the_limit_wait_in_order(pool):
    entries = [apply(pool, f"t{i}") for i in range(4)]
    assert pool.queue.keys == [entries[0].key, entries[1].key]
    assert [e.phase for e in entries[2:]] == [Phase.WAITING] * 2
    pool.grow(1)
    assert pool.queue.keys[-1] == entries[2].key and pool.table.limit == 3
    pool.shrink(5)
    assert pool.table.limit == 1 and pool.limit == 1
    info = pool._get_info()
    assert info["max-concurrency"] == 1 and info["queued"] == 1 and len(info["jobs"]) == 4
    assert entries[3].info()["phase"] == "Queued"


def test_a_retry_of_a_task_in_flight_is_a_new_delivery(pool):
    first = apply(pool, "same")
    retry = apply(pool, "same", retries=1)
    assert retry is not first and retry.key != first.key and len(pool.queue.keys) == 2


def test_the_same_message_again_joins_its_delivery(pool):
    first = apply(pool, "same")
    again = apply(pool, "same")
    assert again is first and len(first.requests) == 2 and pool.table.slots_used == 1


def test_terminating_a_waiting_delivery_reports_it_revoked(pool):
    outcomes = []
    apply(pool, "busy-1")
    apply(pool, "busy-2")
    waiting = apply(pool, "waiting", error_callback=outcomes.append)
    waiting.terminate(15)
    assert type(outcomes[0].exception).__name__ == "Terminated"
    assert pool.table.get(waiting.key) is None and waiting.key not in pool.queue.keys


class FakeRequest:
    """What _is_revocation reads of Celery's Request."""

    def __init__(self, task_id: str, revoked: bool = False, on_ack: bool = False, cancelled: bool = False):
        self.id = task_id
        self._already_revoked = revoked
        self._terminate_on_ack = ("pool", 15) if on_ack else None
        self._already_cancelled = cancelled

    def on_success(self, result):
        pass


def test_revoke_and_cancel_are_told_apart(pool):
    from celery.worker import state

    def delivery_for(request):
        entry = apply(pool, request.id)
        entry.requests[0].success = request.on_success
        return entry

    assert _is_revocation(delivery_for(FakeRequest("r1", revoked=True)))
    assert _is_revocation(delivery_for(FakeRequest("r2", on_ack=True)))
    assert not _is_revocation(delivery_for(FakeRequest("c1", cancelled=True)))
    state.revoked.add("c2")
    try:
        assert _is_revocation(delivery_for(FakeRequest("c2")))
    finally:
        state.revoked.discard("c2")
