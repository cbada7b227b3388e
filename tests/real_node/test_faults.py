"""Faults as a real node reports them: an eviction through the Eviction API, a kernel OOM
kill in the container's memory cgroup, an image the node does not have."""

from __future__ import annotations

import pytest

from conftest import running_pod_of
from k8s_celery.testing import wait_until
from k8s_celery.testing.realnode.faults import evict

from .conftest import write_real_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def test_evicted_pod_is_requeued_and_runs_again(start_real_shim, taskapp, real_cluster, real_namespace,
                                                pod_recorder):
    shim = start_real_shim()
    result = taskapp.count.delay("real-evicted", 6)
    pod = running_pod_of(real_cluster, real_namespace, result.id)
    # A short grace period: the first attempt is killed (SIGKILL after 1 s) whatever it
    # does with SIGTERM, so that only the second attempt can run to its end.
    evict(real_cluster.api, real_namespace, pod["metadata"]["name"], grace_period=1)
    assert result.get(timeout=120) == 1
    conditions = [condition for _, _, seen in pod_recorder.of_task(result.id)
                  if seen["metadata"]["name"] == pod["metadata"]["name"]
                  for condition in seen["status"].get("conditions", [])]
    assert {"type": "DisruptionTarget", "reason": "EvictionByEvictionAPI"} in [
        {"type": c["type"], "reason": c.get("reason")} for c in conditions]
    assert "lost (" in shim.log()
    wait_until(lambda: len({state["pod"] for state in pod_recorder.terminated(result.id)}) == 2,
               message="both attempts' pods ended", timeout=30)


def test_oom_killed_pods_are_requeued_then_the_task_fails(start_real_shim, taskapp, real_cluster, real_namespace,
                                                          pod_recorder, tmp_path, pod_broker_url, taskapp_image):
    manifests = tmp_path / "limited"
    write_real_manifest(manifests, "kubernetes", pod_broker_url, taskapp_image.name,
                        resources={"requests": {"memory": "64Mi"}, "limits": {"memory": "160Mi"}})
    shim = start_real_shim(manifests=manifests, env={"K8S_CELERY_MAX_LOST_ATTEMPTS": "2"})
    result = taskapp.allocate.delay(512)
    with pytest.raises(Exception) as raised:
        result.get(timeout=180)
    assert type(raised.value).__name__ == "TaskLostError"
    assert "OOMKilled" in str(raised.value)
    states = wait_until(lambda: (lambda s: s if len(s) == 2 else None)(pod_recorder.terminated(result.id)),
                        message="both attempts' containers ended", timeout=30)
    assert [(state["reason"], state["exitCode"]) for state in states] == [("OOMKilled", 137)] * 2, states
    assert "giving up" in shim.log()
    assert taskapp.add.delay(1, 1).get(timeout=120) == 2, "the worker must go on"


def test_missing_image_fails_after_the_pending_timeout(start_real_shim, taskapp, tmp_path, pod_broker_url):
    manifests = tmp_path / "absent-image"
    write_real_manifest(manifests, "kubernetes", pod_broker_url, "k8s-celery.local/absent:never-built")
    start_real_shim(manifests=manifests, env={"K8S_CELERY_PENDING_TIMEOUT": "6"})
    result = taskapp.add.delay(1, 2)
    with pytest.raises(Exception) as raised:
        result.get(timeout=120)
    assert type(raised.value).__name__ == "PodPendingTimeout"
    assert "ErrImageNeverPull" in str(raised.value)
