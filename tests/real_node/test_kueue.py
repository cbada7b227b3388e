"""Kueue on the real node: its manager and webhooks on the real-node cluster, task Jobs
admitted against a ClusterQueue's quota and run in real containers; a task preempted by a
higher WorkloadPriorityClass has its container stopped (SIGTERM to the runner, the grace
period) and runs again in the same Job, neither failed nor counted lost. (Kueue's other
events, on the process kubelet: tests/test_kueue_e2e.py.) These run after the other
real-node tests: from here on, Kueue's webhook sees every Job of the cluster."""

from __future__ import annotations

import pytest
import yaml

from conftest import JobRecorder
from k8s_celery.testing import wait_until
from k8s_celery.testing.kueue import Kueue
from k8s_celery.testing.pytest_plugin import KUEUE_SETTINGS
from test_kueue_e2e import QUEUE_LABEL, queues, runs, task_pods

from .conftest import write_real_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


@pytest.fixture
def real_kueue(real_cluster):
    """Kueue's manager on the session's real-node cluster, started by the first test that
    needs it and stopped with the cluster."""
    if real_cluster.kueue is None:
        real_cluster.kueue = Kueue(real_cluster, settings=KUEUE_SETTINGS).start()
    return real_cluster


def test_kueue_admits_real_task_pods_by_quota_and_a_preempted_one_runs_again_in_its_job(
        real_kueue, start_real_shim, taskapp, real_namespace, real_manifests, pod_broker_url, taskapp_image):
    cluster = real_kueue
    queues(cluster, real_namespace, cpus=1)
    path = write_real_manifest(real_manifests, "kubernetes", pod_broker_url, taskapp_image.name,
                               resources={"requests": {"cpu": "1"}})
    manifest = yaml.safe_load(path.read_text())
    manifest["metadata"]["labels"][QUEUE_LABEL] = "tasks"
    path.write_text(yaml.safe_dump(manifest))
    shim = start_real_shim(env={"K8S_CELERY_PENDING_TIMEOUT": "20"})

    with JobRecorder(cluster, real_namespace) as recorder:
        low = taskapp.count.delay("rn-preempted", 6)
        wait_until(lambda: any(p["status"].get("phase") == "Running" for p in task_pods(cluster, real_namespace)),
                   timeout=60, message="the low-priority task's container running")
        high = taskapp.urgent.delay("rn-urgent")
        queued = [taskapp.count.delay(f"rn-queued-{i}") for i in range(2)]
        most = 0

        def all_done() -> bool:
            nonlocal most
            most = max(most, len(task_pods(cluster, real_namespace)))
            return all(result.ready() for result in (low, high, *queued))
        wait_until(all_done, timeout=180, interval=0.2, message="the four tasks done")
    assert high.get(timeout=1) == 1 and low.get(timeout=1) == 1 and [r.get(timeout=1) for r in queued] == [1, 1]
    assert most == 1, "never more task pods than the quota admits"
    assert runs(taskapp, "rn-preempted") == 1  # the preempted run never finished; the resumed one did
    assert len(recorder.jobs) == 4 and all(len(names) == 1 for names in recorder.jobs.values()), recorder.jobs
    log = shim.log()
    assert log.count("suspended, waiting to be admitted") >= 3 and log.count(" admitted\n") >= 5, log
    assert "was lost" not in log and "requeueing" not in log and "PodPendingTimeout" not in log
