"""End to end: real Redis, the local cluster, the real worker, producers in this process."""

from __future__ import annotations

import json
import time

import pytest

from conftest import POD_REFUSES_PICKLE, jobs_in, running_pod_of, write_manifest
from k8s_celery.cluster import collection_path
from k8s_celery.manifest import (ANNOTATION_PAYLOAD, ANNOTATION_PAYLOAD_MODE, ANNOTATION_TASK_ID, ENV_PAYLOAD_LIMIT,
                                 LABEL_QUEUE, LABEL_TASK_HASH, MANAGED_BY, MANAGED_SELECTOR, payload_secret_name,
                                 task_hash)
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
    assert [s["metadata"]["name"] for s in secrets] == [payload_secret_name(job)]
    assert payload_secret_name(job).startswith(job["metadata"]["name"] + "-")
    assert secrets[0]["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    payload = secrets[0]["data"]["payload.json"]
    assert payload not in json.dumps(job) and result.id not in json.dumps(job["spec"]["template"]["spec"])
    assert result.get(timeout=60) == 2
    add = taskapp.add.delay(2, 3)
    assert add.get(timeout=60) == 5


def test_an_inline_queue_needs_no_secret_and_refuses_a_payload_too_large_for_it(
        start_shim, taskapp, k8s_cluster, k8s_namespace, manifests, broker_url):
    write_manifest(manifests, "kubernetes", broker_url, job_annotations={ANNOTATION_PAYLOAD_MODE: "inline"})
    shim = start_shim()
    marker = "inline-argument-5d2e"
    result = taskapp.echo.delay(marker)
    job = wait_until(lambda: next(iter(jobs_in(k8s_cluster, k8s_namespace)), None), message="a Job")
    assert marker in job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_PAYLOAD]
    assert result.get(timeout=60) == marker
    secrets, _ = k8s_cluster.api.list(collection_path("secrets", k8s_namespace), label_selector=MANAGED_SELECTOR)
    assert secrets == []
    big = taskapp.echo.delay("x" * ENV_PAYLOAD_LIMIT)
    with pytest.raises(Exception) as raised:
        big.get(timeout=60)
    assert type(raised.value).__name__ == "PayloadTooLarge" and "inline" in str(raised.value)
    assert taskapp.add.delay(20, 22).get(timeout=60) == 42, "the worker goes on"
    assert "PayloadTooLarge" in shim.log()


def unacked(redis_server) -> int:
    return redis_server.client().hlen("unacked")


def test_failure_keeps_exception_type_and_traceback(start_shim, taskapp, redis_server):
    start_shim()
    result = taskapp.fail.delay("boom")
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=60)
    assert result.state == "FAILURE"
    assert "raise ValueError(message)" in result.traceback
    wait_until(lambda: unacked(redis_server) == 0, message="the message to be acked")


def test_retry_runs_a_second_job(start_shim, taskapp, k8s_cluster, k8s_namespace):
    start_shim()
    result = taskapp.retry_once.delay("r1")
    assert result.get(timeout=90) == "retried"
    assert int(taskapp.store().get("attempts:r1")) == 2


def test_evicted_pod_is_requeued_and_runs_again(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim()
    result = taskapp.count.delay("evicted", 3)
    pod = running_pod_of(k8s_cluster, k8s_namespace, result.id)
    time.sleep(0.5)
    k8s_cluster.kubelet.evict(k8s_namespace, pod["metadata"]["name"])
    assert result.get(timeout=90) == 1  # only the second attempt ran to its end
    assert "lost (pod Evicted" in shim.log()
    assert f"{result.id}] -> Job" in shim.log() and result.id[:8] in shim.log()
    assert "-2" in [line for line in shim.log().splitlines() if "-> Job" in line][-1][-3:]


def test_oom_on_every_attempt_fails_after_the_limit(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim(env={"K8S_CELERY_MAX_LOST_ATTEMPTS": "2"})
    result = taskapp.sleep.delay(30)
    for attempt in range(2):
        pod = running_pod_of(k8s_cluster, k8s_namespace, result.id)
        k8s_cluster.kubelet.oom_kill(k8s_namespace, pod["metadata"]["name"])
        wait_until(lambda: pod["metadata"]["name"] not in str(
            [p["metadata"]["name"] for p in k8s_cluster.api.list(
                collection_path("pods", k8s_namespace),
                label_selector=f"{LABEL_TASK_HASH}={task_hash(result.id)}")[0]
             if p["status"].get("phase") == "Running"]), message="the OOM to be seen")
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert type(raised.value).__name__ == "TaskLostError"
    assert "OOMKilled" in str(raised.value)
    assert taskapp.add.delay(1, 1).get(timeout=60) == 2, "the worker must go on"
    assert "giving up" in shim.log()


def test_unpullable_image_fails_after_pending_timeout(start_shim, taskapp, tmp_path, broker_url):
    from conftest import write_manifest

    directory = tmp_path / "bad-manifests"
    write_manifest(directory, "kubernetes", broker_url, image="registry.local/unpullable:latest")
    start_shim(manifests=directory, env={"K8S_CELERY_PENDING_TIMEOUT": "4"})
    result = taskapp.add.delay(1, 2)
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert type(raised.value).__name__ == "PodPendingTimeout"
    assert "ErrImagePull" in str(raised.value) or "ImagePullBackOff" in str(raised.value)


def test_revoke_terminate_deletes_the_job(start_shim, taskapp, k8s_cluster, k8s_namespace):
    start_shim()
    result = taskapp.sleep.delay(60)
    running_pod_of(k8s_cluster, k8s_namespace, result.id)
    result.revoke(terminate=True)
    wait_until(lambda: not jobs_in(k8s_cluster, k8s_namespace), timeout=30, message="Job deletion")
    wait_until(lambda: result.state == "REVOKED", timeout=30, message="REVOKED state")


def test_time_limits(start_shim, taskapp):
    start_shim()
    soft = taskapp.soft_limited.delay()
    hard = taskapp.hard_limited.delay()
    assert soft.get(timeout=60) == "caught soft limit"
    with pytest.raises(Exception) as raised:
        hard.get(timeout=60)
    assert type(raised.value).__name__ == "TimeLimitExceeded"


def test_chain_and_chord(start_shim, taskapp):
    from celery import chain, chord

    start_shim(max_jobs=6)
    assert chain(taskapp.add.s(1, 2), taskapp.add.s(3), taskapp.add.s(4)).delay().get(timeout=120) == 10
    assert chord([taskapp.add.s(i, i) for i in range(4)])(taskapp.tsum.s()).get(timeout=120) == 12


def test_max_jobs_bounds_jobs_in_flight(start_shim, taskapp, k8s_cluster, k8s_namespace):
    import threading

    start_shim(max_jobs=5)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(jobs_in(k8s_cluster, k8s_namespace)))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = [taskapp.add.delay(i, i) for i in range(50)]
        assert [r.get(timeout=300) for r in results] == [2 * i for i in range(50)]
    finally:
        done.set()
        sampler.join()
    assert 1 <= peak <= 5


def test_bad_messages_do_not_stop_the_worker(start_shim, taskapp, redis_server):
    shim = start_shim()
    with taskapp.app.producer_or_acquire() as producer:
        producer.publish(b"\x00not json", routing_key="kubernetes", exchange="kubernetes",
                         content_type="application/json", content_encoding="utf-8",
                         headers={"task": "taskapp.add", "id": "malformed-1"})
    taskapp.app.send_task("taskapp.does_not_exist", args=(1,))
    big = taskapp.echo.delay("x" * (2 * 1024 * 1024))
    with pytest.raises(Exception) as raised:
        big.get(timeout=60)
    assert type(raised.value).__name__ == "PayloadTooLarge"
    assert taskapp.add.delay(20, 22).get(timeout=60) == 42
    log = shim.log()
    assert "Received unregistered task of type 'taskapp.does_not_exist'" in log
    assert "malformed-1" in log or "invalid" in log.lower() or "Can't decode message body" in log
    assert "PayloadTooLarge" in log or "cannot run as a Job" in log
    wait_until(lambda: unacked(redis_server) == 0, message="every message settled")


@pytest.mark.parametrize("payload_mode", ["private", "inline"])
def test_a_body_the_pod_cannot_decode_fails_the_task_in_the_backend(
        payload_mode, start_shim, taskapp, redis_server, manifests, broker_url):
    """The worker decodes each message as it takes it (Celery's consumer does), so a body only the
    pod cannot decode is one its app refuses. As a prefork pool process whose tracer raises, the
    worker stores that failure and acks, through either payload path."""
    write_manifest(manifests, "kubernetes", broker_url, extra_env=POD_REFUSES_PICKLE,
                   job_annotations={ANNOTATION_PAYLOAD_MODE: "inline"} if payload_mode == "inline" else None)
    shim = start_shim()
    result = taskapp.add.apply_async((1, 2), serializer="pickle")
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert result.state == "FAILURE"
    assert type(raised.value).__name__ == "ContentDisallowed", repr(raised.value)
    wait_until(lambda: unacked(redis_server) == 0, message="the message to be acked")
    assert f"Task taskapp.add[{result.id}] could not run" in shim.log()
    assert taskapp.add.delay(1, 2).get(timeout=60) == 3, "the worker goes on"


def test_stock_celery_worker_with_custom_pool(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim(plain_celery=True)
    assert taskapp.add.delay(5, 6).get(timeout=60) == 11
    assert "k8s-celery pool: namespace" in shim.log()
    stats = taskapp.app.control.inspect(destination=[shim.hostname], timeout=5).stats()
    pool = stats[shim.hostname]["pool"]
    assert pool["implementation"] == "k8s_celery.pool:KubernetesPool"
    assert pool["max-concurrency"] == 5


def test_inspect_active_shows_the_pod(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim()
    result = taskapp.sleep.delay(5)
    pod = running_pod_of(k8s_cluster, k8s_namespace, result.id)
    inspect = taskapp.app.control.inspect(destination=[shim.hostname], timeout=5)
    active = wait_until(lambda: (inspect.active() or {}).get(shim.hostname), message="an active task")
    assert active[0]["id"] == result.id and active[0]["worker_pid"] == pod["metadata"]["name"]
    pool = inspect.stats()[shim.hostname]["pool"]
    assert pool["in-flight"] == 1 and pool["processes"] == [pod["metadata"]["name"]]
    assert result.get(timeout=60) == 5
