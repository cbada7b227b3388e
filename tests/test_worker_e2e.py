"""End to end: real Redis, the local cluster, the real worker, producers in this process."""

from __future__ import annotations

import json

import pytest

from conftest import jobs_in
from k8s_celery.cluster import collection_path
from k8s_celery.manifest import ANNOTATION_TASK_ID, LABEL_QUEUE, LABEL_TASK_HASH, MANAGED_BY, task_hash
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster


def test_result_arrives_and_job_carries_labels(start_shim, taskapp, k8s_cluster, k8s_namespace):
    start_shim()
    result = taskapp.sleep.apply_async((2,))
    job = wait_until(lambda: next(iter(jobs_in(k8s_cluster, k8s_namespace)), None), message="a Job")
    labels = job["metadata"]["labels"]
    assert labels[MANAGED_BY] == "k8s-celery"
    assert labels[LABEL_QUEUE] == "kubernetes"
    assert labels[LABEL_TASK_HASH] == task_hash(result.id)
    assert job["metadata"]["annotations"][ANNOTATION_TASK_ID] == result.id
    secrets, _ = k8s_cluster.api.list(collection_path("secrets", k8s_namespace),
                                      label_selector=f"{LABEL_TASK_HASH}={task_hash(result.id)}")
    assert [s["metadata"]["name"] for s in secrets] == [job["metadata"]["name"]]
    assert secrets[0]["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    payload = secrets[0]["data"]["payload.json"]
    assert payload not in json.dumps(job) and result.id not in json.dumps(job["spec"]["template"]["spec"])
    assert result.get(timeout=60) == 2
    add = taskapp.add.delay(2, 3)
    assert add.get(timeout=60) == 5
