"""The shim under Kueue (a second local cluster running Kueue's real manager and webhooks):
task Jobs wait suspended in Kueue's queue without timing out, never more run than the quota
allows, and a preempted task runs again in the same Job, neither failed nor counted lost."""

from __future__ import annotations

import pytest
import yaml

from conftest import jobs_in, shims_started, write_manifest
from k8s_celery.cluster import collection_path
from k8s_celery.testing import wait_until
from k8s_celery.testing.pytest_plugin import namespace_name

pytestmark = pytest.mark.cluster

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


@pytest.fixture
def kueue_namespace(k8s_kueue_cluster, request):
    name = k8s_kueue_cluster.create_namespace(namespace_name(request))
    yield name
    k8s_kueue_cluster.delete_namespace(name)


def queues(cluster, namespace: str, cpus: int) -> None:
    """A ClusterQueue of ``cpus`` CPUs that preempts lower priorities, and the namespace's
    LocalQueue ``tasks`` in it."""
    kueue = cluster.kueue
    kueue.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "default"}}, exist_ok=True)
    kueue.create("workloadpriorityclasses", {"kind": "WorkloadPriorityClass", "metadata": {"name": "high"},
                                             "value": 1000}, exist_ok=True)
    kueue.create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": namespace}, "spec": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "preemption": {"withinClusterQueue": "LowerPriority"},
        "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
            {"name": "default", "resources": [{"name": "cpu", "nominalQuota": str(cpus)}]}]}]}})
    kueue.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": "tasks"},
                                 "spec": {"clusterQueue": namespace}}, namespace=namespace)


@pytest.fixture
def start_queued_shim(k8s_kueue_cluster, kueue_namespace, tmp_path, broker_url, taskapp, request):
    """Start `k8s-celery worker`s whose Jobs (1 CPU each) go to Kueue's LocalQueue ``tasks``."""
    directory = tmp_path / "queued-manifests"
    path = write_manifest(directory, "kubernetes", broker_url)
    manifest = yaml.safe_load(path.read_text())
    manifest["metadata"]["labels"][QUEUE_LABEL] = "tasks"
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1"}}
    path.write_text(yaml.safe_dump(manifest))
    with shims_started(k8s_kueue_cluster, kueue_namespace, directory, tmp_path, broker_url, taskapp,
                       request) as start:
        yield start


def task_pods(cluster, namespace: str) -> list[dict]:
    pods, _ = cluster.api.list(collection_path("pods", namespace),
                               label_selector="app.kubernetes.io/managed-by=k8s-celery")
    return [pod for pod in pods if pod["status"].get("phase") in ("Pending", "Running")
            and not pod["metadata"].get("deletionTimestamp")]


def test_tasks_wait_in_kueue_past_the_pending_timeout_and_never_run_beyond_the_quota(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim(env={"K8S_CELERY_PENDING_TIMEOUT": "3"})
    results = [taskapp.count.delay(f"queued-{i}", 2) for i in range(3)]
    most = 0

    def all_done() -> bool:
        nonlocal most
        most = max(most, len(task_pods(k8s_kueue_cluster, kueue_namespace)))
        return all(result.ready() for result in results)

    wait_until(all_done, timeout=90, interval=0.2, message="the three tasks done")
    assert [result.get(timeout=1) for result in results] == [1, 1, 1]  # the third waited > 3 s, suspended
    assert most == 1
    assert shim.log().count("suspended, waiting to be admitted") >= 2
    assert "PodPendingTimeout" not in shim.log()


def test_a_preempted_task_runs_again_in_the_same_job(start_queued_shim, taskapp, k8s_kueue_cluster,
                                                     kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim()
    low = taskapp.count.delay("preempted", 5)
    wait_until(lambda: any(p["status"].get("phase") == "Running" for p in task_pods(k8s_kueue_cluster,
                                                                                   kueue_namespace)),
               message="the low-priority task running")
    # A high-priority Job on the same queue: Kueue preempts the task (suspends its Job; the Job
    # controller deletes its pod), runs the high one, then admits the task's Job again.
    high = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "urgent", "labels": {QUEUE_LABEL: "tasks", PRIORITY_LABEL: "high"}},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
                                                              "containers": [{"name": "main", "image": "busybox",
                                                                              "command": ["sh", "-c", "sleep 1"],
                                                                              "resources": {"requests": {"cpu": "1"}}}]}}}}
    k8s_kueue_cluster.api.create(collection_path("jobs", kueue_namespace), high)
    assert low.get(timeout=120) == 1  # one run to its end: the preempted one never finished
    log = shim.log()
    # Queued at creation, admitted, preempted (suspended again), admitted again.
    assert log.count("suspended, waiting to be admitted") >= 2 and log.count(" admitted\n") >= 2, log
    assert "was lost" not in log and "requeueing" not in log and "PodPendingTimeout" not in log
    task_jobs = [job for job in jobs_in(k8s_kueue_cluster, kueue_namespace)]
    assert len({job["metadata"]["labels"]["k8s-celery.io/attempt"] for job in task_jobs}) <= 1
