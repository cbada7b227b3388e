"""Pod Security admission, as the real API server enforces it on a namespace's label: every
Job manifest this project ships or shows makes pods that "restricted" admits; a task whose pod
the namespace refuses fails with the API server's reason, and the worker goes on. (The chart's
pods run under "restricted": tests/test_deploy.py, and on the real node tests/real_node.)"""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import RESTRICTED, label_namespace, without_security_contexts
from k8s_celery.cluster import ApiError, collection_path
from k8s_celery.config import Settings, validate_job_manifest
from k8s_celery.manifest import TaskSpec, build_job
from test_deploy import KUBERNETES_VERSION, KUSTOMIZE_BASE, REQUIRED_VALUES, ROOT, helm_template, queue_manifests

pytestmark = pytest.mark.cluster


def shipped_manifests() -> dict[str, dict]:
    """Every Job manifest a user may start from: the examples, the kustomize base's, the
    chart's (defaults and an override) and each Job in a yaml block of the README."""
    found = {str(path.relative_to(ROOT)): yaml.safe_load(path.read_text())
             for path in [*(ROOT / "examples" / "manifests").rglob("*.yaml"),
                          *(KUSTOMIZE_BASE / "manifests").glob("*.yaml")]}
    values = {**REQUIRED_VALUES, "queues": {"celery": {}, "reports": {"resources": {"limits": {"memory": "4Gi"}}}}}
    found.update({f"the chart's queue {queue}": manifest
                  for queue, manifest in queue_manifests(helm_template(values)).items()})
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    for number, block in enumerate(blocks, 1):
        manifest = yaml.safe_load(block)
        if isinstance(manifest, dict) and manifest.get("kind") == "Job":
            found[f"README.md, yaml block {number}"] = manifest
    return found


def task_pod(manifest: dict, source: str) -> dict:
    """The pod the Job controller would create for a task of ``manifest``, as the worker renders it."""
    template = validate_job_manifest(manifest, source, KUBERNETES_VERSION)
    spec = TaskSpec(task_id="0c4a5e8e-0000-4000-8000-000000000001", name="taskapp.add", queue="kubernetes",
                    request={}, body=b"[[1, 2], {}, {}]", content_type="application/json",
                    content_encoding="utf-8", delivery="0123456789abcdef0123", secret_name="payload")
    job = build_job(template, spec, "any", app="taskapp", runner_command=Settings().runner_command,
                    ttl_seconds=60)
    pod_template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "admission-probe", "labels": pod_template["metadata"]["labels"]},
            "spec": pod_template["spec"]}


def admitted(cluster, namespace: str, pod: dict) -> str | None:
    """``None`` when the API server would admit ``pod`` (a dry run); otherwise its reason."""
    try:
        cluster.api.request("POST", collection_path("pods", namespace), pod, params={"dryRun": "All"})
    except ApiError as exc:
        return exc.message
    return None


def test_every_shipped_manifest_makes_pods_that_restricted_admits(k8s_cluster, k8s_namespace):
    label_namespace(k8s_cluster, k8s_namespace, RESTRICTED)
    manifests = shipped_manifests()
    assert {"examples/manifests/kubernetes/manifest.yaml", "deploy/kustomize/base/manifests/celery.yaml",
            "the chart's queue celery", "the chart's queue reports", "README.md, yaml block 1"} <= set(manifests)
    pods = {source: task_pod(manifest, source) for source, manifest in manifests.items()}
    for account in {pod["spec"].get("serviceAccountName") for pod in pods.values()} - {None, "default"}:
        k8s_cluster.api.create(collection_path("serviceaccounts", k8s_namespace), {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}})
    refused = {source: admitted(k8s_cluster, k8s_namespace, pod) for source, pod in pods.items()}
    assert {source: reason for source, reason in refused.items() if reason} == {}
    # The dry run is enforced: the same pod without its securityContexts is refused.
    bare = task_pod(manifests["examples/manifests/kubernetes/manifest.yaml"], "bare")
    without_security_contexts(bare["spec"])
    assert 'violates PodSecurity "restricted:latest"' in admitted(k8s_cluster, k8s_namespace, bare)


def test_a_pod_the_namespace_refuses_fails_its_task_with_the_api_servers_reason(start_shim, taskapp, k8s_cluster,
                                                                                  k8s_namespace):
    label_namespace(k8s_cluster, k8s_namespace, RESTRICTED)
    # The API server enforces it: a pod without the restricted profile's settings is refused.
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}}
    with pytest.raises(ApiError, match='violates PodSecurity "restricted:latest"'):
        k8s_cluster.api.create(collection_path("pods", k8s_namespace), bare)

    # The tests' default manifest sets no securityContext: the Job is created, its pods refused.
    shim = start_shim(env={"K8S_CELERY_PENDING_TIMEOUT": "6"})
    result = taskapp.add.delay(1, 2)
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert type(raised.value).__name__ == "PodPendingTimeout"
    assert 'FailedCreate: Error creating: pods "kc-' in str(raised.value)
    assert 'violates PodSecurity "restricted:latest"' in str(raised.value)

    label_namespace(k8s_cluster, k8s_namespace, {key: None for key in RESTRICTED})
    assert taskapp.add.delay(2, 2).get(timeout=60) == 4, "the worker must go on"
    assert "PodPendingTimeout" in shim.log()
