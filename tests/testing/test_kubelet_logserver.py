"""The process kubelet's log endpoint, read as a user reads it: ``pods/log`` of the real
API server, which proxies to the kubelet with its client certificate."""

from __future__ import annotations

import pytest

from k8s_celery.cluster import ApiError, collection_path, object_path
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster

SCRIPT = 'for i in 1 2 3 4 5; do echo "line $i"; done; echo "to stderr" >&2; sleep 1; printf "late\\nno newline"'
OUTPUT = b"line 1\nline 2\nline 3\nline 4\nline 5\nto stderr\nlate\nno newline"


def create_pod(api, namespace: str, name: str, script: str, secret: str | None = None) -> None:
    container = {"name": "main", "image": "busybox", "command": ["sh", "-c", script]}
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container]}
    if secret:
        spec["volumes"] = [{"name": "payload", "secret": {"secretName": secret}}]
        container["volumeMounts"] = [{"name": "payload", "mountPath": "/payload"}]
    api.create(collection_path("pods", namespace),
               {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def phase(api, namespace: str, name: str) -> str:
    return api.get(object_path("pods", namespace, name))["status"].get("phase", "")


def read_log(api, namespace: str, name: str, **params) -> bytes:
    params = {key: str(value).lower() if isinstance(value, bool) else value for key, value in params.items()}
    return b"".join(api.stream(object_path("pods", namespace, name, "log"), params))


def test_a_followed_log_streams_the_real_output_to_the_container_end(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    create_pod(api, k8s_namespace, "talker", SCRIPT)
    wait_until(lambda: phase(api, k8s_namespace, "talker") == "Running", message="the pod Running")
    assert read_log(api, k8s_namespace, "talker", follow=True) == OUTPUT
    wait_until(lambda: phase(api, k8s_namespace, "talker") == "Succeeded", message="the pod Succeeded")

    assert read_log(api, k8s_namespace, "talker") == OUTPUT
    assert k8s_cluster.kubelet.pod_log(k8s_namespace, "talker").encode() == OUTPUT
    assert read_log(api, k8s_namespace, "talker", container="main", tailLines=2) == b"late\nno newline"
    assert read_log(api, k8s_namespace, "talker", tailLines=0) == b""
    assert read_log(api, k8s_namespace, "talker", tailLines=100) == OUTPUT
    assert read_log(api, k8s_namespace, "talker", limitBytes=9) == b"line 1\nli"  # cut mid-line, as a kubelet
    assert read_log(api, k8s_namespace, "talker", tailLines=3, limitBytes=12) == b"to stderr\nla"


def test_log_errors_say_what_the_kubelet_says(k8s_cluster, k8s_namespace):
    api = k8s_cluster.api
    create_pod(api, k8s_namespace, "done", "echo once")
    wait_until(lambda: phase(api, k8s_namespace, "done") == "Succeeded", message="the pod Succeeded")
    with pytest.raises(ApiError, match='previous terminated container "main" in pod "done" not found') as raised:
        read_log(api, k8s_namespace, "done", previous=True)
    assert raised.value.status == 400
    with pytest.raises(ApiError, match="not supported by the process kubelet"):
        read_log(api, k8s_namespace, "done", timestamps=True)
    with pytest.raises(ApiError) as raised:
        read_log(api, k8s_namespace, "done", container="other")
    assert raised.value.status == 400  # the API server checks the name against the spec

    create_pod(api, k8s_namespace, "mounting", "echo never", secret="absent")
    wait_until(lambda: phase(api, k8s_namespace, "mounting") == "Pending" and api.get(
        object_path("pods", k8s_namespace, "mounting"))["spec"].get("nodeName"), message="the pod bound")
    with pytest.raises(ApiError, match='container "main" in pod "mounting" is waiting to start') as raised:
        read_log(api, k8s_namespace, "mounting")
    assert raised.value.status == 400

    api.delete(object_path("pods", k8s_namespace, "done"), propagation=None, grace_period=0)
    wait_until(lambda: not any(p["metadata"]["name"] == "done"
                               for p in api.list(collection_path("pods", k8s_namespace))[0]),
               message="the pod gone")
    with pytest.raises(ApiError) as raised:
        read_log(api, k8s_namespace, "done")
    assert raised.value.not_found
