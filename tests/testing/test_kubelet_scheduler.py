"""Which pods the process kubelet's scheduler binds."""

from __future__ import annotations

from k8s_celery.testing.kubelet.scheduler import awaits_scheduling


def pod(spec: dict | None = None, **metadata) -> dict:
    return {"metadata": {"name": "p", **metadata}, "spec": spec or {}}


def test_an_unbound_pod_for_the_default_scheduler_awaits_scheduling():
    assert awaits_scheduling(pod())
    assert awaits_scheduling(pod({"schedulerName": "default-scheduler"}))


def test_bound_deleted_or_foreign_pods_do_not():
    assert not awaits_scheduling(pod({"nodeName": "local-node"}))
    assert not awaits_scheduling(pod(deletionTimestamp="2026-01-01T00:00:00Z"))
    assert not awaits_scheduling(pod({"schedulerName": "volcano"}))
