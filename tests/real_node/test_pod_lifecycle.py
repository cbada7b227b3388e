"""What only a real node shows about a task's pod: the runner is PID 1 of its PID
namespace (where SIGTERM left at its default action does nothing), the Job's deadline
ends the pod through the kubelet, and container statuses come sorted by name."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from conftest import jobs_in, running_pod_of
from k8s_celery.manifest import ANNOTATION_TASK_ID
from k8s_celery.testing import wait_until

from .conftest import task_container, write_real_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def test_revoke_terminate_ends_the_pod_at_once_and_the_task_stays_revoked(
        start_real_shim, taskapp, real_cluster, real_namespace, pod_recorder):
    start_real_shim()
    started = time.monotonic()
    result = taskapp.count.delay("real-revoked", 8)  # installs no signal handler of its own
    running_pod_of(real_cluster, real_namespace, result.id)
    time.sleep(1)
    revoked = time.monotonic()
    result.revoke(terminate=True)
    deleting = wait_until(lambda: pod_recorder.first(result.id, lambda kind, pod: pod["metadata"].get(
        "deletionTimestamp")), timeout=10, message="the pod's deletion to start")
    stopped = wait_until(lambda: pod_recorder.first(result.id, lambda kind, pod: any(
        s["state"].get("terminated") for s in pod["status"].get("containerStatuses") or [])), timeout=60,
        message="the task container to end")
    gone = wait_until(lambda: pod_recorder.first(result.id, lambda kind, pod: kind == "DELETED"), timeout=60,
                      message="the pod to be gone")
    print(f"deletion started {deleting[0] - revoked:.2f}s after the revoke; the container ended "
          f"{stopped[0] - deleting[0]:.2f}s and the pod was gone {gone[0] - deleting[0]:.2f}s after that")
    assert deleting[0] - revoked < 5, "the worker deletes the Job as soon as it gets the revoke"
    # SIGTERM ends the runner at once (not the grace period's SIGKILL 30 s later); the
    # kubelet notices within its 1 s relist, then removes the pod's volumes and the pod.
    assert stopped[0] - deleting[0] <= 2.0
    assert gone[0] - deleting[0] <= 4.0
    wait_until(lambda: result.state == "REVOKED", timeout=30, message="REVOKED state")
    time.sleep(max(0.0, started + 8 + 4 - time.monotonic()))  # past the time the task would have ended
    assert result.state == "REVOKED"
    assert taskapp.store().get("runs:real-revoked") is None, "the revoked task ran to its end"


def test_hard_time_limit_fails_the_task_at_its_deadline(start_real_shim, taskapp, real_cluster, real_namespace):
    start_real_shim()
    result = taskapp.hard_limited.delay()  # time_limit=2, sleeps 60 s

    def started_job():
        return next((job for job in jobs_in(real_cluster, real_namespace)
                     if job["metadata"]["annotations"].get(ANNOTATION_TASK_ID) == result.id
                     and job.get("status", {}).get("startTime")), None)
    job = wait_until(started_job, timeout=60, message="the Job started")
    assert job["spec"]["activeDeadlineSeconds"] == 2
    with pytest.raises(Exception) as raised:
        result.get(timeout=90)
    failed_at = time.time()
    assert type(raised.value).__name__ == "TimeLimitExceeded"
    deadline = datetime.fromisoformat(job["status"]["startTime"]).timestamp() + 2
    print(f"TimeLimitExceeded {failed_at - deadline:.2f}s after the deadline (startTime + 2 s)")
    # startTime has whole seconds: the deadline is known to within one second.
    assert failed_at - deadline <= 2 + 1, f"TimeLimitExceeded came {failed_at - deadline:.1f}s after the deadline"


def test_a_sidecar_sorted_before_the_task_container_does_not_hide_the_outcome(
        start_real_shim, taskapp, tmp_path, pod_broker_url, taskapp_image, pod_recorder):
    manifests = tmp_path / "sidecar"
    sidecar = task_container(taskapp_image.name, pod_broker_url, name="aaa-sidecar",
                             command=["python", "-c", "import time; time.sleep(1)"])
    write_real_manifest(manifests, "kubernetes", pod_broker_url, taskapp_image.name, sidecars=[sidecar])
    start_real_shim(manifests=manifests)
    success = taskapp.add.delay(2, 3)
    assert success.get(timeout=120) == 5
    failure = taskapp.fail.delay("beside a sidecar")
    with pytest.raises(ValueError, match="beside a sidecar"):
        failure.get(timeout=120)
    assert "raise ValueError(message)" in failure.traceback
    states = wait_until(lambda: (lambda s: s if len(s) == 2 else None)(pod_recorder.terminated(success.id)),
                        message="both containers ended", timeout=30)
    assert [state["container"] for state in states] in (["aaa-sidecar", "task"], ["task", "aaa-sidecar"])
    last = [pod for _, _, pod in pod_recorder.of_task(success.id)][-1]
    assert [s["name"] for s in last["status"]["containerStatuses"]] == ["aaa-sidecar", "task"]
