"""Pod Security "restricted" on the real node: the Job manifests this project ships run their
tasks in real containers of a namespace that enforces it (non-root, read-only root filesystem,
no capabilities, the runtime's seccomp profile), and a manifest the namespace refuses fails its
task with the API server's reason while the worker goes on. (The chart: test_chart.py.)"""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import RESTRICTED, label_namespace, without_security_contexts
from k8s_celery.cluster import collection_path
from test_deploy import KUSTOMIZE_BASE, ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def runnable(manifest: dict, image: str) -> dict:
    """``manifest`` with the test app's image in place of the example's."""
    manifest = copy.deepcopy(manifest)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container.update(image=image, imagePullPolicy="Never")
    return manifest


def write(directory, queue: str, manifest: dict) -> None:
    (directory / queue).mkdir(parents=True, exist_ok=True)
    (directory / queue / "manifest.yaml").write_text(yaml.safe_dump(manifest))


def test_shipped_manifests_run_under_restricted_and_a_refused_pod_fails_its_task(
        start_real_shim, taskapp, real_cluster, real_namespace, real_manifests, taskapp_image, pod_broker_url):
    api = real_cluster.api
    label_namespace(real_cluster, real_namespace, RESTRICTED)
    broker = [{"name": "CELERY_BROKER_URL", "value": pod_broker_url},
              {"name": "CELERY_RESULT_BACKEND", "value": pod_broker_url}]

    example = runnable(yaml.safe_load((ROOT / "examples/manifests/kubernetes/manifest.yaml").read_text()),
                       taskapp_image.name)
    example["spec"]["template"]["spec"]["containers"][0]["env"] = broker
    write(real_manifests, "example", example)

    # The kustomize base reads the broker from a Secret and runs as its own task account.
    base = runnable(yaml.safe_load((KUSTOMIZE_BASE / "manifests" / "celery.yaml").read_text()), taskapp_image.name)
    api.create(collection_path("secrets", real_namespace), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "celery-broker"},
        "stringData": {item["name"]: item["value"] for item in broker}})
    api.create(collection_path("serviceaccounts", real_namespace), {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": base["spec"]["template"]["spec"]["serviceAccountName"]}})
    write(real_manifests, "kustomize", base)

    refused = copy.deepcopy(example)  # as the example, without its securityContexts
    without_security_contexts(refused["spec"]["template"]["spec"])
    write(real_manifests, "refused", refused)

    shim = start_real_shim(queues="kubernetes,example,kustomize,refused",
                           env={"K8S_CELERY_PENDING_TIMEOUT": "8"})
    outcome = taskapp.add.apply_async((1, 2), queue="refused")
    assert taskapp.add.apply_async((2, 3), queue="example").get(timeout=120) == 5
    assert taskapp.add.apply_async((3, 4), queue="kustomize").get(timeout=120) == 7

    with pytest.raises(Exception) as raised:
        outcome.get(timeout=60)
    assert type(raised.value).__name__ == "PodPendingTimeout"
    assert 'FailedCreate: Error creating: pods "kc-' in str(raised.value)
    assert 'violates PodSecurity "restricted:latest"' in str(raised.value)
    assert taskapp.add.delay(4, 5).get(timeout=120) == 9, "the worker must go on"
    assert "PodPendingTimeout" in shim.log()
