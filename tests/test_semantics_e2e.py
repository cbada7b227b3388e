"""Celery's semantics, end to end: what a prefork worker does, the shim does.

Task ids that come back in new messages (retry, replace, chord_unlock), expiry and
revokes while waiting for a slot, runners that cannot run the task, time limits,
revokes racing a launch, sidecars, relists, lost nodes, quotas, cold shutdown.
"""

from __future__ import annotations

import signal
import time

import pytest

from conftest import EventRecorder, jobs_in, live_jobs, running_pod_of, stop_process, write_manifest
from k8s_celery.cluster import collection_path, object_path
from k8s_celery.manifest import LABEL_QUEUE
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster


def runs(taskapp, key: str) -> int:
    return int(taskapp.store().get(f"runs:{key}") or 0)


def launches(shim, task_id: str) -> int:
    """How many Jobs the worker created for a task id."""
    return sum(1 for line in shim.log().splitlines() if f"[{task_id}] -> Job" in line)


# -- 1. a task id in a new message is a new delivery -----------------------------------

def test_retry_with_countdown_zero_runs_again(start_shim, taskapp):
    shim = start_shim()
    result = taskapp.retry_now.delay("now")
    assert result.get(timeout=60) == "ran 2 times"
    assert int(taskapp.store().get("attempts:now")) == 2
    assert launches(shim, result.id) == 2


def test_replaced_task_runs_its_replacement(start_shim, taskapp):
    shim = start_shim()
    result = taskapp.replace_with_add.delay(20, 22)
    assert result.get(timeout=60) == 42
    assert launches(shim, result.id) == 2, "the replacement runs in a Job of its own"


def test_chord_unlock_retries_until_the_chord_fires(start_shim, taskapp, tmp_path, broker_url, monkeypatch):
    """On a result backend without native chords, celery.chord_unlock retries itself
    (same task id, retries + 1) every second until the header is done."""
    from celery import Celery, chord

    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    manifests = tmp_path / "unlock-manifests"
    write_manifest(manifests, "kubernetes", broker_url,
                   extra_env=[{"name": "CELERY_RESULT_BACKEND", "value": backend}])
    shim = start_shim(manifests=manifests, env={"CELERY_RESULT_BACKEND": backend})
    monkeypatch.setenv("CELERY_RESULT_BACKEND", backend)  # the environment wins over the argument
    producer = Celery("taskapp", broker=broker_url, backend=backend)
    producer.conf.update(task_default_queue="kubernetes", result_extended=True)
    header = [producer.signature("taskapp.sleep", (0.5 + i,)) for i in range(2)]
    # interval 0: each retry's message arrives while the pod that sent it is still ending.
    result = chord(header)(producer.signature("taskapp.tsum"), countdown=0, interval=0)
    assert result.get(timeout=120) == 2.0
    unlock = [line for line in shim.log().splitlines() if "celery.chord_unlock[" in line and "-> Job" in line]
    assert len(unlock) >= 2, "chord_unlock retried at least once, each retry in a Job of its own"


# -- 2. expiry and revokes while waiting for a slot ------------------------------------

def test_expired_while_waiting_for_a_slot_is_revoked_without_a_job(start_shim, taskapp):
    shim = start_shim(max_jobs=1, args=("--prefetch-multiplier", "4"))
    busy = taskapp.sleep.delay(4)
    expiring = taskapp.add.apply_async((1, 1), expires=1)
    with pytest.raises(Exception) as raised:
        expiring.get(timeout=60)
    assert type(raised.value).__name__ == "TaskRevokedError"
    assert expiring.state == "REVOKED"
    assert busy.get(timeout=60) == 4
    assert launches(shim, expiring.id) == 0


def test_revoked_while_waiting_is_never_launched(start_shim, taskapp):
    shim = start_shim(max_jobs=1, args=("--prefetch-multiplier", "4"))
    busy = taskapp.sleep.delay(5)
    waiting = taskapp.count.delay("revoked-waiting")
    inspect = taskapp.app.control.inspect(destination=[shim.hostname], timeout=2)
    wait_until(lambda: waiting.id in str(inspect.reserved()), timeout=30, message="the task reserved")
    waiting.revoke()
    assert busy.get(timeout=60) == 5
    wait_until(lambda: waiting.state == "REVOKED", timeout=30, message="REVOKED")
    time.sleep(2)
    assert runs(taskapp, "revoked-waiting") == 0 and launches(shim, waiting.id) == 0


# -- 3. a pod that cannot run the task tells the result backend -----------------------

def test_task_the_pod_cannot_run_fails_in_the_result_backend(start_shim, taskapp, tmp_path, broker_url):
    from celery import group

    manifests = tmp_path / "old-image"
    write_manifest(manifests, "kubernetes", broker_url,
                   extra_env=[{"name": "TASKAPP_REGISTER_HIDDEN", "value": "0"}])
    start_shim(manifests=manifests)
    result = taskapp.hidden.delay()
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert type(raised.value).__name__ == "NotRegistered" and "older than the worker" in str(raised.value)
    assert result.state == "FAILURE"
    # A chord whose header cannot run still ends: its body's errback sees the failure.
    chorded = (group(taskapp.hidden.s(), taskapp.add.s(1, 1)) | taskapp.tsum.s()).delay()
    with pytest.raises(Exception):
        chorded.get(timeout=90)


def test_app_that_does_not_import_fails_in_the_result_backend(start_shim, taskapp, tmp_path, broker_url):
    manifests = tmp_path / "broken-app"
    write_manifest(manifests, "kubernetes", broker_url,
                   extra_env=[{"name": "PYTHONPATH", "value": str(tmp_path / "nowhere")}])
    start_shim(manifests=manifests)
    result = taskapp.add.delay(1, 2)
    with pytest.raises(Exception) as raised:
        result.get(timeout=60)
    assert "taskapp" in str(raised.value)
    assert result.state == "FAILURE"


# -- 4. no result backend --------------------------------------------------------------

def test_restored_messages_run_without_a_result_backend(start_shim, taskapp, tmp_path, broker_url):
    manifests = tmp_path / "no-backend"
    write_manifest(manifests, "kubernetes", broker_url,
                   extra_env=[{"name": "CELERY_RESULT_BACKEND", "value": "disabled://"}])
    options = dict(manifests=manifests, max_jobs=1, args=("--prefetch-multiplier", "4"),
                   env={"CELERY_RESULT_BACKEND": "disabled://", "K8S_CELERY_DRAIN_TIMEOUT": "1"})
    first = start_shim(**options)
    sent = [taskapp.count.delay("nb-0", 4)] + [taskapp.count.delay(f"nb-{i}") for i in (1, 2)]
    wait_until(lambda: all(f"[{r.id}] received" in first.log() for r in sent), timeout=30,
               message="every message received")
    first.stop()  # the two waiting messages go back to the queue, marked redelivered
    start_shim(**options)
    wait_until(lambda: all(runs(taskapp, f"nb-{i}") for i in range(3)), timeout=90,
               message="every task run")
    assert [runs(taskapp, f"nb-{i}") for i in range(3)] == [1, 1, 1]


# -- 5. time limits --------------------------------------------------------------------

def test_worker_time_limits_apply_to_every_task(start_shim, taskapp):
    start_shim(args=("--soft-time-limit", "1", "--time-limit", "4"))
    soft = taskapp.catch_soft.delay(30)
    hard = taskapp.stubborn.delay(30)
    assert soft.get(timeout=60) == "caught soft limit"
    with pytest.raises(Exception) as raised:
        hard.get(timeout=60)
    assert type(raised.value).__name__ == "TimeLimitExceeded"


def test_hard_time_limit_events_and_state_match_prefork(start_shim, taskapp, broker_url, tmp_path):
    from test_ecosystem_e2e import celery_process

    start_shim()
    prefork = celery_process(["worker", "-Q", "default", "-c", "1", "-n", "prefork-limits@local", "-E",
                              "-l", "INFO", "--without-mingle", "--without-gossip"],
                             broker_url, tmp_path / "prefork.log")
    try:
        with EventRecorder(taskapp.app) as events:
            wait_until(lambda: taskapp.app.control.ping(destination=["prefork-limits@local"], timeout=0.5),
                       timeout=60, message="the prefork worker")
            on_prefork = taskapp.local_hard_limited.delay()
            on_shim = taskapp.hard_limited.delay()
            for result in (on_prefork, on_shim):
                with pytest.raises(Exception) as raised:
                    result.get(timeout=60)
                assert type(raised.value).__name__ == "TimeLimitExceeded"
            time.sleep(2)  # the last events
    finally:
        stop_process(prefork)
    assert events.types(on_shim.id) == events.types(on_prefork.id), dict(events.events)
    assert on_shim.state == on_prefork.state == "FAILURE"


# -- 6. revoke while the Job is being created ------------------------------------------

def test_revoke_during_job_creation_leaves_no_job(start_shim, taskapp, k8s_cluster, k8s_namespace):
    # A slow API (a token bucket of one request every 3 s) holds the launch mid-creation.
    shim = start_shim(env={"K8S_CELERY_API_QPS": "0.3", "K8S_CELERY_API_BURST": "1"})
    result = taskapp.count.delay("revoked-launch")  # counted as soon as a pod runs it
    wait_until(lambda: f"[{result.id}] received" in shim.log(),
               timeout=30, message="the task received")
    result.revoke(terminate=True)
    wait_until(lambda: f"[{result.id}] -> Job" in shim.log(), timeout=60, message="the create to return")
    wait_until(lambda: not jobs_in(k8s_cluster, k8s_namespace), timeout=30, message="no Job left")
    assert result.state == "REVOKED"
    time.sleep(5)  # a pod of the task, had one started, would have counted its run by now
    assert runs(taskapp, "revoked-launch") == 0


# -- 7. pods with more than one container ----------------------------------------------

SIDECAR = {"name": "aaa-proxy", "image": "registry.local/proxy:1", "command": ["sleep", "300"]}


def reported(shim, results, k8s_cluster, k8s_namespace, redis_server) -> None:
    """The worker itself saw each outcome: logged it, acked the message, removed the Job."""
    wait_until(lambda: all(f"[{r.id}] succeeded" in shim.log() or f"[{r.id}] raised" in shim.log()
                           for r in results), timeout=30, message="the outcomes logged by the worker")
    # a failure's Job is kept for a post-mortem
    wait_until(lambda: not live_jobs(k8s_cluster, k8s_namespace) and not redis_server.client().hlen("unacked"),
               timeout=30, message="messages acked and Jobs removed")
    assert " lost (" not in shim.log()


def test_sidecar_sorting_first_does_not_hide_the_outcome(start_shim, taskapp, tmp_path, broker_url,
                                                         k8s_cluster, k8s_namespace, redis_server):
    manifests = tmp_path / "sidecar"
    write_manifest(manifests, "kubernetes", broker_url, sidecars=[SIDECAR])
    shim = start_shim(manifests=manifests)
    result = taskapp.add.delay(2, 3)
    assert result.get(timeout=60) == 5
    failing = taskapp.fail.delay("from beside a sidecar")
    with pytest.raises(ValueError):
        failing.get(timeout=60)
    reported(shim, [result, failing], k8s_cluster, k8s_namespace, redis_server)


def test_native_sidecar(start_shim, taskapp, tmp_path, broker_url, k8s_cluster, k8s_namespace, redis_server):
    manifests = tmp_path / "native-sidecar"
    write_manifest(manifests, "kubernetes", broker_url,
                   initContainers=[{**SIDECAR, "name": "aaa-native", "restartPolicy": "Always"}])
    shim = start_shim(manifests=manifests)
    result = taskapp.add.delay(20, 30)
    assert result.get(timeout=60) == 50
    reported(shim, [result], k8s_cluster, k8s_namespace, redis_server)


# -- 8. relists of the watches ---------------------------------------------------------

def test_constant_relists_lose_no_task(start_shim, taskapp, redis_server, k8s_cluster, k8s_namespace):
    # Many (suspended, podless) Jobs make each relist slow, so that Jobs are created while
    # a relist is under way and are missing from its snapshot.
    for index in range(300):
        k8s_cluster.api.create(collection_path("jobs", k8s_namespace), {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"ballast-{index}", "labels": {"app.kubernetes.io/managed-by": "k8s-celery"}},
            "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "x", "image": "registry.local/none:1"}]}}}})
    shim = start_shim(max_jobs=10, env={"K8S_CELERY_WATCH_RESYNC": "0.2"})
    results = [taskapp.count.delay(f"relist-{i}") for i in range(40)]
    assert [r.get(timeout=180) for r in results] == [1] * 40
    assert " lost " not in shim.log() and "requeueing" not in shim.log()
    assert all(launches(shim, r.id) == 1 for r in results)


# -- 9. a pod stuck terminating on a lost node -----------------------------------------

def test_pod_stuck_terminating_is_requeued(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim(env={"K8S_CELERY_TERMINATING_TIMEOUT": "3"})
    result = taskapp.count.delay("stuck", 6)
    pod = running_pod_of(k8s_cluster, k8s_namespace, result.id)
    name = pod["metadata"]["name"]
    k8s_cluster.kubelet.lose(k8s_namespace, name)
    k8s_cluster.api.delete(object_path("pods", k8s_namespace, name), propagation=None, grace_period=1)
    assert result.get(timeout=90) == 1
    assert "still terminating" in shim.log()
    assert k8s_cluster.api.get(object_path("pods", k8s_namespace, name))["metadata"]["deletionTimestamp"]


# -- 10. smaller ones ------------------------------------------------------------------

def test_task_id_reused_on_purpose_runs_again(start_shim, taskapp):
    shim = start_shim()
    task_id = "reused-on-purpose"
    assert taskapp.add.apply_async((1, 1), task_id=task_id).get(timeout=60) == 2
    taskapp.count.apply_async(("reuse",), task_id=task_id)
    # It runs, as on a prefork worker (whose result backend keeps the first SUCCESS).
    wait_until(lambda: f"Task taskapp.count[{task_id}] succeeded" in shim.log(), timeout=60,
               message="the second task's outcome")
    assert runs(taskapp, "reuse") == 1


def test_topic_exchange_queues_resolve_their_manifests(start_shim, taskapp, tmp_path, broker_url,
                                                       k8s_cluster, k8s_namespace):
    manifests = tmp_path / "topic"
    for queue in ("k8s-reports", "k8s-images"):
        write_manifest(manifests, queue, broker_url, extra_env=[{"name": "TASKAPP_TOPIC", "value": "1"}])
    start_shim(manifests=manifests, queues="k8s-reports,k8s-images", env={"TASKAPP_TOPIC": "1"})
    from kombu import Exchange, Queue

    # Published through one queue's topic exchange: the routing key alone decides the queue.
    through = Queue("k8s-reports", Exchange("tasks", type="topic"), routing_key="reports.#")
    report = taskapp.echo.apply_async(("report",), queue=through, routing_key="reports.daily.pdf")
    image = taskapp.echo.apply_async(("image",), queue=through, routing_key="images.thumbnail")
    seen = {}

    def record():
        for job in jobs_in(k8s_cluster, k8s_namespace):
            seen[job["metadata"]["annotations"]["k8s-celery.io/task-id"]] = job["metadata"]["labels"][LABEL_QUEUE]
        return len(seen) == 2
    wait_until(record, timeout=60, interval=0.05, message="both Jobs")
    assert (report.get(timeout=60), image.get(timeout=60)) == ("report", "image")
    assert seen == {report.id: "k8s-reports", image.id: "k8s-images"}


def test_quota_exceeded_waits_for_room(start_shim, taskapp, k8s_cluster, k8s_namespace):
    k8s_cluster.api.create(collection_path("resourcequotas", k8s_namespace), {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-job"},
        "spec": {"hard": {"count/jobs.batch": "1"}}})
    wait_until(lambda: k8s_cluster.api.get(object_path("resourcequotas", k8s_namespace, "one-job"))
               .get("status", {}).get("hard"), timeout=30, message="the quota controller")
    shim = start_shim()
    first, second = taskapp.count.delay("quota-1", 3), taskapp.count.delay("quota-2")
    assert (first.get(timeout=90), second.get(timeout=90)) == (1, 1)
    assert "waits for quota" in shim.log()


def test_cold_shutdown_leaves_running_jobs_for_adoption(start_shim, taskapp, k8s_cluster, k8s_namespace):
    first = start_shim()
    result = taskapp.count.delay("cold", 8)
    running_pod_of(k8s_cluster, k8s_namespace, result.id)
    first.kill(signal.SIGQUIT)  # cold shutdown: Celery cancels the active requests
    first.process.wait(30)
    assert [j for j in jobs_in(k8s_cluster, k8s_namespace) if not j["metadata"].get("deletionTimestamp")], \
        "the Job keeps running"
    second = start_shim()
    assert result.get(timeout=90) == 1
    assert runs(taskapp, "cold") == 1
    assert "adopting running Job" in second.log() or "already ran in Job" in second.log()
