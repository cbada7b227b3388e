"""Which deliveries the pool's maintenance looks at each second (pure logic)."""

from __future__ import annotations

from k8s_celery.config import Settings
from k8s_celery.deliveries import DeliveryTable, Phase
from k8s_celery.maintenance import Maintenance
from test_deliveries import delivery

NOW = 1000.0


def due(check_running: bool, admission_timeout: float = 0.0) -> list[str]:
    table = DeliveryTable(10)
    for task_id, accepted, queued_since in (("pending", False, None), ("running", True, None),
                                            ("queued", False, NOW - 30), ("queued-long", False, NOW - 90)):
        tracked = table.add(delivery(task_id))
        tracked.phase, tracked.accepted, tracked.queued_since = Phase.TRACKING, accepted, queued_since
    table.add(delivery("launching"))  # not yet tracking: its launch reconciles it
    enqueued: list[str] = []
    maintenance = Maintenance(table, cache=None, broker=None, sweeper=None,
                              enqueue=lambda key: enqueued.append(table.get(key).task_id),
                              settings=Settings(admission_timeout=admission_timeout))
    maintenance._enqueue_due(check_running, NOW)
    return sorted(enqueued)


def test_every_second_only_pods_not_yet_running_and_not_waiting_in_kueue():
    assert due(check_running=False) == ["pending"]


def test_a_job_waiting_in_kueue_is_looked_at_once_its_admission_timeout_is_due():
    assert due(check_running=False, admission_timeout=60) == ["pending", "queued-long"]


def test_every_tracked_delivery_but_those_waiting_in_kueue_at_the_running_check():
    assert due(check_running=True) == ["pending", "running"]
    assert due(check_running=True, admission_timeout=60) == ["pending", "queued-long", "running"]
