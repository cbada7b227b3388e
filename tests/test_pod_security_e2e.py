"""Pod Security admission, as the real API server enforces it on a namespace's label: a task
whose pod the namespace refuses fails with the API server's reason, and the worker goes on.
(The chart's own pods are admitted under "restricted": tests/test_deploy.py.)"""

from __future__ import annotations

import pytest

from conftest import RESTRICTED
from k8s_celery.cluster import ApiError, collection_path, object_path

pytestmark = pytest.mark.cluster


def set_labels(cluster, namespace: str, labels: dict) -> None:
    cluster.api.patch(object_path("namespaces", None, namespace), {"metadata": {"labels": labels}},
                      strategy="merge-patch")


def test_a_pod_the_namespace_refuses_fails_its_task_with_the_api_servers_reason(start_shim, taskapp, k8s_cluster,
                                                                                  k8s_namespace):
    set_labels(k8s_cluster, k8s_namespace, RESTRICTED)
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

    set_labels(k8s_cluster, k8s_namespace, {key: None for key in RESTRICTED})
    assert taskapp.add.delay(2, 2).get(timeout=60) == 4, "the worker must go on"
    assert "PodPendingTimeout" in shim.log()
