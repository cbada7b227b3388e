"""Rendering Jobs and Secrets from a queue's template (pure functions)."""

from __future__ import annotations

import base64
import json
import re
from types import SimpleNamespace

import pytest

from k8s_celery.config import validate_object
from k8s_celery.errors import PayloadTooLarge, TaskLaunchError
from k8s_celery.manifest import (ANNOTATION_TASK_ID, ENV_PAYLOAD_LIMIT, LABEL_DELIVERY, LABEL_TASK_HASH, MANAGED_BY,
                                 ANNOTATION_PAYLOAD, ANNOTATION_PAYLOAD_MODE, PAYLOAD_ENV, PAYLOAD_KEY, payload_inline,
                                 TaskSpec, build_job, build_secret, job_name, label_value,
                                 payload_secret_name, task_hash, task_overrides)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TEMPLATE = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"labels": {"team": "data"}},
            "spec": {"template": {"spec": {"containers": [{
                "name": "task", "image": "example/app:1", "args": ["ignored"],
                "env": [{"name": "A", "value": "1"}]}]}}}}


def spec(**changes) -> TaskSpec:
    values = dict(task_id="9c2b1c1e-0000-4000-8000-000000000001", name="proj.tasks.add",
                  queue="kubernetes", delivery=DELIVERY, secret_name="payload-1", request={"id": "x", "args": [1], "kwargs": {}}, body=b'[[1, 2], {}, {}]',
                  content_type="application/json", content_encoding="utf-8")
    values.update(changes)
    return TaskSpec(**values)


DELIVERY = "0123456789abcdef0123"


@pytest.mark.parametrize("task_id", ["simple", "UPPER/with spaces", "ü" * 80, "---", "a" * 300,
                                     "id.with.dots_and_underscores"])
def test_job_names_are_dns_labels_and_deterministic(task_id):
    name = job_name(task_id, DELIVERY, 3)
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert name == job_name(task_id, DELIVERY, 3) and name != job_name(task_id, DELIVERY, 4)
    assert name.endswith("-3")


def test_deliveries_of_one_task_id_get_distinct_names():
    assert job_name("task-1", DELIVERY) != job_name("task-1", "f" * 20)


def test_label_values_are_valid():
    assert label_value("proj.tasks.add") == "proj.tasks.add"
    assert label_value("weird name!") == "weird_name"
    assert len(label_value("x" * 100)) == 63


def test_job_is_rendered_from_the_template():
    job = build_job(TEMPLATE, spec(time_limit=9.5, attempt=2), "ns", app="proj",
                    runner_command=["k8s-celery", "run-task"], ttl_seconds=600)
    validate_object(job, "rendered", "1.33")
    meta = job["metadata"]
    assert meta["name"] == job_name(spec().task_id, DELIVERY, 2) and meta["namespace"] == "ns"
    assert meta["labels"][LABEL_DELIVERY] == DELIVERY
    assert meta["labels"]["team"] == "data" and meta["labels"][MANAGED_BY] == "k8s-celery"
    assert meta["labels"][LABEL_TASK_HASH] == task_hash(spec().task_id)
    assert meta["annotations"][ANNOTATION_TASK_ID] == spec().task_id
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 10
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"][LABEL_TASK_HASH] == task_hash(spec().task_id)
    assert pod["spec"]["restartPolicy"] == "Never"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["k8s-celery", "run-task"] and "args" not in container
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["A"] == "1" and env["K8S_CELERY_APP"] == "proj"
    payload = next(e for e in container["env"] if e["name"] == PAYLOAD_ENV)
    assert payload == {"name": PAYLOAD_ENV,
                       "valueFrom": {"secretKeyRef": {"name": "payload-1", "key": PAYLOAD_KEY}}}
    assert not pod["spec"]["volumes"] and not container["volumeMounts"], "no volume: the pod starts at once"
    assert payload_secret_name(job) == "payload-1"
    assert TEMPLATE["spec"]["template"]["spec"]["containers"][0]["args"] == ["ignored"], "template mutated"


def test_a_payload_too_large_for_the_environment_is_mounted():
    big = spec(body=b"x" * ENV_PAYLOAD_LIMIT)
    job = build_job(TEMPLATE, big, "ns", app="proj", runner_command=["r"], ttl_seconds=None)
    validate_object(job, "rendered", "1.33")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert PAYLOAD_ENV not in {e["name"] for e in container["env"]}
    assert {"name": "K8S_CELERY_PAYLOAD", "value": "/var/run/k8s-celery/payload.json"} in container["env"]
    assert pod["volumes"] == [{"name": "k8s-celery-payload",
                               "secret": {"secretName": "payload-1", "defaultMode": 0o440}}]
    assert container["volumeMounts"] == [{"name": "k8s-celery-payload", "mountPath": "/var/run/k8s-celery",
                                          "readOnly": True}]
    assert payload_secret_name(job) == "payload-1"


def test_an_inline_queue_s_payload_is_an_annotation_of_its_pods():
    template = {**TEMPLATE, "metadata": {**TEMPLATE["metadata"],
                                         "annotations": {ANNOTATION_PAYLOAD_MODE: "inline"}}}
    job = build_job(template, spec(), "ns", app="proj", runner_command=["r"], ttl_seconds=None)
    validate_object(job, "rendered", "1.33")
    assert payload_inline(job) and payload_secret_name(job) is None
    pod = job["spec"]["template"]
    payload = json.loads(pod["metadata"]["annotations"][ANNOTATION_PAYLOAD])
    assert payload["id"] == spec().task_id and base64.b64decode(payload["body"]) == spec().body
    [env] = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == PAYLOAD_ENV]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_PAYLOAD}']"}}
    assert not pod["spec"]["volumes"]
    with pytest.raises(PayloadTooLarge, match="inline"):
        build_job(template, spec(body=b"x" * ENV_PAYLOAD_LIMIT), "ns", app="proj", runner_command=["r"],
                  ttl_seconds=None)


def test_the_payload_never_appears_in_the_job():
    marker = "a-private-argument-9f1e"
    job = build_job(TEMPLATE, spec(body=json.dumps([[marker], {}, {}]).encode()), "ns", app="proj",
                    runner_command=["r"], ttl_seconds=None)
    rendered = json.dumps(job)
    assert marker not in rendered and base64.b64encode(marker.encode()).decode()[:12] not in rendered


def test_no_time_limit_means_no_deadline():
    job = build_job(TEMPLATE, spec(), "ns", app=None, runner_command=["r"], ttl_seconds=None)
    assert "activeDeadlineSeconds" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]


def test_secret_holds_the_payload_without_decoded_args():
    secret = build_secret(spec(), "ns", job_uid="uid-1")
    validate_object(secret, "rendered", "1.33")
    payload = json.loads(base64.b64decode(secret["data"][PAYLOAD_KEY]))
    assert payload["task"] == "proj.tasks.add" and payload["id"] == spec().task_id
    assert base64.b64decode(payload["body"]) == spec().body
    assert "args" not in payload["request"]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["metadata"]["name"] == "payload-1"


def test_oversized_payload_is_refused():
    with pytest.raises(PayloadTooLarge, match="at most"):
        build_secret(spec(body=b"x" * (1024 * 1024)), "ns")


def test_task_overrides_merge_onto_the_pod():
    overrides = {"resources": {"limits": {"memory": "1Gi"}}, "nodeSelector": {"pool": "big"},
                 "tolerations": [{"key": "big", "operator": "Exists"}],
                 "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]}
    job = build_job(TEMPLATE, spec(overrides=overrides), "ns", app="p", runner_command=["r"], ttl_seconds=None)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"limits": {"memory": "1Gi"}}
    assert pod["nodeSelector"] == {"pool": "big"} and pod["tolerations"][0]["key"] == "big"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["A"] == "2" and env["B"] == "3"


def test_unknown_override_is_refused():
    with pytest.raises(TaskLaunchError, match="hostNetwork"):
        build_job(TEMPLATE, spec(overrides={"hostNetwork": True}), "ns", app="p", runner_command=["r"],
                  ttl_seconds=None)


def test_kueue_options_label_the_job_not_the_pod():
    overrides = {"queueName": "gpu", "workloadPriorityClass": "urgent"}
    job = build_job(TEMPLATE, spec(overrides=overrides), "ns", app="p", runner_command=["r"], ttl_seconds=None)
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu" and labels["kueue.x-k8s.io/priority-class"] == "urgent"
    assert not any(key.startswith("kueue.x-k8s.io/") for key in job["spec"]["template"]["metadata"]["labels"])
    declared = SimpleNamespace(name="t", kubernetes={"queue_name": "gpu", "workload_priority_class": "urgent"})
    assert task_overrides(declared) == overrides


@pytest.mark.parametrize("value", ["", "two words", "x" * 64, 3, None])
def test_a_kueue_option_that_is_not_a_label_value_is_refused(value):
    with pytest.raises(TaskLaunchError, match="queueName.*label value"):
        build_job(TEMPLATE, spec(overrides={"queueName": value}), "ns", app="p", runner_command=["r"],
                  ttl_seconds=None)
