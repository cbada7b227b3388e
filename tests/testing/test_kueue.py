"""Kueue's manager on the local cluster (k8s_celery.testing.kueue): the real webhook suspends a
queue-labelled Job, the real controllers admit Jobs against a ClusterQueue's quota."""

from __future__ import annotations

import pytest

from k8s_celery.cluster import collection_path, object_path
from k8s_celery.testing import wait_until
from k8s_celery.testing.kueue import served_webhooks
from k8s_celery.testing.pytest_plugin import namespace_name

pytestmark = pytest.mark.cluster

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def queued_job(name: str, queue: str, seconds: int) -> dict:
    container = {"name": "main", "image": "busybox", "command": ["sh", "-c", f"sleep {seconds}"],
                 "resources": {"requests": {"cpu": "1"}}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
                                                              "terminationGracePeriodSeconds": 1,
                                                              "containers": [container]}}}}


def test_only_the_webhooks_the_manager_serves_are_registered():
    configuration = {"webhooks": [
        {"name": "mjob", "rules": [{"apiGroups": ["batch"], "resources": ["jobs"]}]},
        {"name": "mclusterqueue", "rules": [{"apiGroups": ["kueue.x-k8s.io"], "resources": ["clusterqueues"]}]},
        {"name": "mdeployment", "rules": [{"apiGroups": ["apps"], "resources": ["deployments"]}]},
        {"name": "mpod", "rules": [{"apiGroups": [""], "resources": ["pods"]}]}]}
    assert [webhook["name"] for webhook in served_webhooks(configuration)] == ["mjob", "mclusterqueue"]


def test_the_webhook_suspends_labelled_jobs_and_the_quota_admits_two_of_three(k8s_kueue_cluster, request):
    api, kueue = k8s_kueue_cluster.api, k8s_kueue_cluster.kueue
    namespace = k8s_kueue_cluster.create_namespace(namespace_name(request))
    kueue.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "default"}}, exist_ok=True)
    kueue.create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": namespace}, "spec": {
        "namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
            {"name": "default", "resources": [{"name": "cpu", "nominalQuota": "2"}]}]}]}})
    kueue.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": "tasks"},
                                 "spec": {"clusterQueue": namespace}}, namespace=namespace)
    created = [api.create(collection_path("jobs", namespace), queued_job(f"job-{i}", "tasks", 3)) for i in range(3)]
    assert all(job["spec"]["suspend"] is True for job in created)  # the mutating webhook, at admission

    most_running = 0

    def all_complete() -> bool:
        nonlocal most_running
        pods, _ = api.list(collection_path("pods", namespace))
        most_running = max(most_running, sum(1 for pod in pods if pod["status"].get("phase") in
                                             ("Pending", "Running")))
        jobs = [api.get(object_path("jobs", namespace, f"job-{i}")) for i in range(3)]
        return all(job["status"].get("succeeded") == 1 for job in jobs)

    wait_until(all_complete, timeout=90, interval=0.2, message="the three Jobs complete")
    assert most_running == 2  # two admitted at once, the third held suspended until one ended
    assert len(kueue.workloads(namespace)) == 3
    # A Job without the label is not Kueue's: created as it is.
    plain = queued_job("plain", "tasks", 0)
    del plain["metadata"]["labels"]
    assert api.create(collection_path("jobs", namespace), plain)["spec"].get("suspend") in (None, False)
