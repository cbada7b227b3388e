"""The payload's ways into a real container: the environment (from the payload Secret) for
most tasks, the Secret mounted for payloads too large for it, a Secret that came after the
pod, which the kubelet would otherwise start only after its back-off, and an inline queue's
payload through the downward API; a body the pod cannot decode, through either."""

from __future__ import annotations

import json

import pytest

from k8s_celery.cluster import collection_path, object_path
from k8s_celery.launcher import ANNOTATION_PAYLOAD_READY
from k8s_celery.manifest import (ANNOTATION_PAYLOAD, ANNOTATION_PAYLOAD_MODE, ENV_PAYLOAD_LIMIT, MANAGED_SELECTOR,
                                 PAYLOAD_ENV)
from k8s_celery.testing import wait_until

from conftest import POD_REFUSES_PICKLE

from .conftest import write_real_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]


def task_pod(recorder, task_id: str) -> dict:
    _, pod = wait_until(lambda: recorder.first(task_id, lambda kind, pod: True), message="the task's pod")
    return pod


def test_the_payload_reaches_the_container_through_its_environment_not_its_spec(
        start_real_shim, taskapp, pod_recorder):
    start_real_shim()
    marker = "private-argument-7c41"
    result = taskapp.echo.delay(marker)
    assert result.get(timeout=120) == marker
    pod = task_pod(pod_recorder, result.id)
    container = pod["spec"]["containers"][0]
    [payload] = [e for e in container["env"] if e["name"] == PAYLOAD_ENV]
    assert set(payload["valueFrom"]) == {"secretKeyRef"}
    assert not [v for v in pod["spec"].get("volumes") or [] if "secret" in v]
    assert marker not in json.dumps(pod)
    # The task's own subprocesses do not inherit the payload.
    assert taskapp.child_environment.delay(PAYLOAD_ENV).get(timeout=120) is None


def test_a_payload_too_large_for_the_environment_is_mounted(start_real_shim, taskapp, pod_recorder):
    start_real_shim()
    value = "x" * (ENV_PAYLOAD_LIMIT + 1024)
    result = taskapp.echo.delay(value)
    assert result.get(timeout=120) == value
    pod = task_pod(pod_recorder, result.id)
    assert [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v]
    assert PAYLOAD_ENV not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}


def test_a_pod_whose_secret_came_late_is_woken(start_real_shim, taskapp, real_cluster, real_namespace,
                                               pod_recorder):
    """A quota refuses the payload Secret: the kubelet cannot start the container and backs
    off. Once the quota has room the worker creates the Secret and wakes the pod."""
    api = real_cluster.api
    api.create(collection_path("resourcequotas", real_namespace), {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-secrets"},
        "spec": {"hard": {"count/secrets": "0"}}})
    wait_until(lambda: api.get(object_path("resourcequotas", real_namespace, "no-secrets"))
               .get("status", {}).get("hard"), timeout=30, message="the quota controller")
    shim = start_real_shim()
    result = taskapp.add.delay(20, 22)

    def waiting(kind, pod):
        state = (pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})
        return state.get("waiting", {}).get("reason") == "CreateContainerConfigError"
    wait_until(lambda: pod_recorder.first(result.id, waiting), timeout=60,
               message="the kubelet to fail for want of the Secret")
    api.delete(object_path("resourcequotas", real_namespace, "no-secrets"))
    assert result.get(timeout=120) == 42
    woken = pod_recorder.first(result.id, lambda kind, pod: ANNOTATION_PAYLOAD_READY in
                               (pod["metadata"].get("annotations") or {}))
    assert woken is not None, pod_recorder.dump(result.id)

    def running(kind, pod):
        state = (pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})
        return "running" in state or "terminated" in state
    started, _ = wait_until(lambda: pod_recorder.first(result.id, running), message="the container's start")
    assert started >= woken[0], "the container started after the wake, not before it"
    assert "woke pod" in shim.log()


def test_an_inline_queue_s_payload_reaches_the_container_through_the_downward_api(
        start_real_shim, taskapp, real_cluster, real_namespace, pod_recorder, tmp_path, pod_broker_url,
        taskapp_image):
    manifests = tmp_path / "inline-manifests"
    write_real_manifest(manifests, "kubernetes", pod_broker_url, taskapp_image.name,
                        annotations={ANNOTATION_PAYLOAD_MODE: "inline"})
    start_real_shim(manifests=manifests)
    marker = "inline-argument-0b7f"
    result = taskapp.echo.delay(marker)
    assert result.get(timeout=120) == marker
    pod = task_pod(pod_recorder, result.id)
    assert marker in pod["metadata"]["annotations"][ANNOTATION_PAYLOAD]
    secrets, _ = real_cluster.api.list(collection_path("secrets", real_namespace), label_selector=MANAGED_SELECTOR)
    assert secrets == []
    assert taskapp.child_environment.delay(PAYLOAD_ENV).get(timeout=120) is None


@pytest.mark.parametrize("payload_mode", ["private", "inline"])
def test_a_body_the_pod_cannot_decode_is_a_failure_in_the_backend(
        payload_mode, start_real_shim, taskapp, pod_recorder, redis_server, tmp_path, pod_broker_url, taskapp_image):
    manifests = tmp_path / "refusing-manifests"
    write_real_manifest(manifests, "kubernetes", pod_broker_url, taskapp_image.name, extra_env=POD_REFUSES_PICKLE,
                        annotations={ANNOTATION_PAYLOAD_MODE: "inline"} if payload_mode == "inline" else None)
    start_real_shim(manifests=manifests)
    result = taskapp.add.apply_async((1, 2), serializer="pickle")
    with pytest.raises(Exception) as raised:
        result.get(timeout=120)
    assert result.state == "FAILURE" and type(raised.value).__name__ == "ContentDisallowed", repr(raised.value)
    [state] = wait_until(lambda: pod_recorder.terminated(result.id), message="the pod's end")
    assert (state["reason"], state["exitCode"]) == ("Error", 2)
    wait_until(lambda: redis_server.client().hlen("unacked") == 0, message="the message to be acked")
