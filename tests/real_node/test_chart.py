"""The Helm chart installed on the real node with the image built from the project's
Dockerfile, in a namespace that enforces Pod Security "restricted": the worker runs as a
real container (uid 1000, read-only root filesystem) under the chart's ServiceAccount,
reaches the API server through the `kubernetes` Service (in-cluster config, kube-proxy),
and runs tasks as Jobs whose pods' token reads no other task's payload."""

from __future__ import annotations

import json

import pytest
import urllib3

from conftest import RESTRICTED, label_namespace, payload_secret_of
from k8s_celery.cluster import collection_path, object_path
from k8s_celery.testing import wait_until
from test_deploy import helm_template, kubectl_run, to_yaml

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

METRICS_PORT = 9808


def chart_values(image: str, broker_url: str) -> dict:
    repository, _, tag = image.rpartition(":")
    env = [{"name": "CELERY_BROKER_URL", "value": broker_url},
           {"name": "CELERY_RESULT_BACKEND", "value": broker_url}]
    return {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "celery": {"app": "taskapp"}, "env": env, "queues": {"kubernetes": {}},
            "worker": {"extraArgs": ["--without-mingle", "--without-gossip"],
                       "extraEnv": [{"name": "K8S_CELERY_PENDING_TIMEOUT", "value": "60"}]},
            # Mount the task account's token, to show that it is refused anyway.
            "taskServiceAccount": {"automountToken": True},
            "metrics": {"port": METRICS_PORT}}


def exec_in(cluster, namespace: str, pod: str, code: str) -> str:
    done = kubectl_run(cluster, "-n", namespace, "exec", pod, "--", "python", "-c", code)
    return done.stdout.strip()


def test_installed_chart_runs_the_worker_in_a_real_container(real_cluster, real_namespace, taskapp,
                                                              taskapp_image, pod_broker_url):
    api = real_cluster.api
    label_namespace(real_cluster, real_namespace, RESTRICTED)
    objects = helm_template(chart_values(taskapp_image.name, pod_broker_url), namespace=real_namespace)
    kubectl_run(real_cluster, "apply", "-n", real_namespace, "-f", "-", stdin=to_yaml(objects))

    def ready_worker() -> dict | None:
        pods, _ = api.list(collection_path("pods", real_namespace), label_selector="app.kubernetes.io/component=worker")
        return next((p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                            for c in p["status"].get("conditions", []))), None)
    pod = wait_until(ready_worker, timeout=120, message="the worker pod Ready (its /readyz probe)")
    name = pod["metadata"]["name"]
    try:
        assert pod["spec"]["serviceAccountName"] == "tasks-k8s-celery"
        [status] = pod["status"]["containerStatuses"]
        assert status["containerID"].startswith("containerd://") and status["image"] == taskapp_image.name

        seen = json.loads(exec_in(real_cluster, real_namespace, name, (
            "import json, os\n"
            "try:\n    open('/probe', 'w'); writable = True\n"
            "except OSError as exc:\n    writable = exc.strerror\n"
            "print(json.dumps({'uid': os.getuid(), 'root': writable, 'kubeconfig': os.environ.get('KUBECONFIG'),"
            " 'service': os.environ['KUBERNETES_SERVICE_HOST'],"
            " 'pid1': open('/proc/1/cmdline').read().split(chr(0))[1:3]}))")))
        assert seen == {"uid": 1000, "root": "Read-only file system", "kubeconfig": None, "service": "10.0.0.1",
                        "pid1": ["/usr/local/bin/k8s-celery", "worker"]}

        assert taskapp.add.delay(2, 3).get(timeout=120) == 5
        assert taskapp.add.delay(4, 5).get(timeout=60) == 9
        other = taskapp.sleep.delay(10)  # another task, its payload Secret there while it runs
        other_secret = payload_secret_of(real_cluster, real_namespace, other.id)
        assert taskapp.api_access.delay(other_secret).get(timeout=60) == {
            "list pods": 403, "create jobs": 403, "get the other task's secret": 403, "list secrets": 403,
            "create a pod mounting it": 403}
        assert other.get(timeout=60) == 10

        jobs, _ = api.list(collection_path("jobs", real_namespace), label_selector="app.kubernetes.io/component=task")
        for job in jobs:  # those not yet deleted after their ack
            assert job["spec"]["template"]["spec"]["serviceAccountName"] == "tasks-k8s-celery-tasks"

        metrics = urllib3.PoolManager().request(
            "GET", f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics", timeout=10).data.decode()
        launched = [line for line in metrics.splitlines()
                    if line.startswith("k8s_celery_jobs_launched_total{") and 'task="taskapp.add"' in line]
        assert [float(line.rsplit(" ", 1)[1]) for line in launched] == [2.0]
    except BaseException:
        print(f"---- worker log ----\n{real_cluster.real_node.pod_log(real_namespace, name)[-20000:]}")
        raise
    finally:
        api.delete(object_path("deployments", real_namespace, "tasks-k8s-celery"))
