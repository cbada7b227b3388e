"""The shim under Kueue (a second local cluster running Kueue's real manager and webhooks):
task Jobs wait suspended in Kueue's queue without timing out, never more run than the quota
allows, a preempted task runs again in the same Job, neither failed nor counted lost; a
deactivated Workload fails its task with Kueue's reason, a queued task can be revoked, a task
naming a missing LocalQueue fails at the admission timeout, and queued Jobs are adopted by the
next worker."""

from __future__ import annotations

import signal

import pytest
import yaml

from conftest import JobRecorder, jobs_in, run_check, running_pod_of, shims_started, write_manifest
from k8s_celery.cluster import collection_path
from k8s_celery.errors import PodPendingTimeout, WorkloadDeactivated
from k8s_celery.testing import wait_until
from k8s_celery.testing.pytest_plugin import namespace_name
from test_check_e2e import grant
from test_reliability_e2e import RESTORE_SECONDS, SHORT_VISIBILITY

pytestmark = pytest.mark.cluster

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture
def kueue_namespace(k8s_kueue_cluster, request):
    name = k8s_kueue_cluster.create_namespace(namespace_name(request))
    yield name
    k8s_kueue_cluster.delete_namespace(name)


def queues(cluster, namespace: str, cpus: int) -> None:
    """A ClusterQueue of ``cpus`` CPUs that preempts lower priorities, and the namespace's
    LocalQueue ``tasks`` in it."""
    kueue = cluster.kueue
    kueue.create("resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": "default"}}, exist_ok=True)
    kueue.create("workloadpriorityclasses", {"kind": "WorkloadPriorityClass", "metadata": {"name": "high"},
                                             "value": 1000}, exist_ok=True)
    kueue.create("clusterqueues", {"kind": "ClusterQueue", "metadata": {"name": namespace}, "spec": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "preemption": {"withinClusterQueue": "LowerPriority"},
        "resourceGroups": [{"coveredResources": ["cpu"], "flavors": [
            {"name": "default", "resources": [{"name": "cpu", "nominalQuota": str(cpus)}]}]}]}})
    kueue.create("localqueues", {"kind": "LocalQueue", "metadata": {"name": "tasks"},
                                 "spec": {"clusterQueue": namespace}}, namespace=namespace)


@pytest.fixture
def start_queued_shim(k8s_kueue_cluster, kueue_namespace, tmp_path, broker_url, taskapp, request):
    """Start `k8s-celery worker`s whose Jobs (1 CPU each) go to Kueue's LocalQueue ``tasks``;
    ``job_labels`` adds labels to the queue's Jobs, ``pod_spec`` fields to their pods."""
    directory = tmp_path / "queued-manifests"
    path = write_manifest(directory, "kubernetes", broker_url, job_labels={QUEUE_LABEL: "tasks"})
    manifest = yaml.safe_load(path.read_text())
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1"}}
    path.write_text(yaml.safe_dump(manifest))
    with shims_started(k8s_kueue_cluster, kueue_namespace, directory, tmp_path, broker_url, taskapp,
                       request) as start:
        def start_queued(job_labels: dict | None = None, pod_spec: dict | None = None, **options):
            manifest["metadata"]["labels"].update(job_labels or {})
            manifest["spec"]["template"]["spec"].update(pod_spec or {})
            path.write_text(yaml.safe_dump(manifest))
            return start(**options)
        yield start_queued


def task_pods(cluster, namespace: str) -> list[dict]:
    pods, _ = cluster.api.list(collection_path("pods", namespace),
                               label_selector="app.kubernetes.io/managed-by=k8s-celery")
    return [pod for pod in pods if pod["status"].get("phase") in ("Pending", "Running")
            and not pod["metadata"].get("deletionTimestamp")]


def test_tasks_wait_in_kueue_past_the_pending_timeout_and_never_run_beyond_the_quota(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim(env={"K8S_CELERY_PENDING_TIMEOUT": "3"})
    results = [taskapp.count.delay(f"queued-{i}", 2) for i in range(3)]
    most = 0

    def all_done() -> bool:
        nonlocal most
        most = max(most, len(task_pods(k8s_kueue_cluster, kueue_namespace)))
        return all(result.ready() for result in results)

    wait_until(all_done, timeout=90, interval=0.2, message="the three tasks done")
    assert [result.get(timeout=1) for result in results] == [1, 1, 1]  # the third waited > 3 s, suspended
    assert most == 1
    assert shim.log().count("suspended, waiting to be admitted") >= 2
    assert "PodPendingTimeout" not in shim.log()


def test_a_preempted_task_runs_again_in_the_same_job(start_queued_shim, taskapp, k8s_kueue_cluster,
                                                     kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim()
    low = taskapp.count.delay("preempted", 5)
    wait_until(lambda: any(p["status"].get("phase") == "Running" for p in task_pods(k8s_kueue_cluster,
                                                                                   kueue_namespace)),
               message="the low-priority task running")
    # A task that names the WorkloadPriorityClass "high" (its `kubernetes` option): Kueue preempts
    # the low one (suspends its Job; the Job controller deletes its pod), runs the urgent one,
    # then admits the low one's Job again.
    with JobRecorder(k8s_kueue_cluster, kueue_namespace) as recorder:
        high = taskapp.urgent.delay("urgent")
        assert high.get(timeout=60) == 1
        assert low.get(timeout=120) == 1  # one run to its end: the preempted one never finished
    assert all(len(names) == 1 for names in recorder.jobs.values()) and len(recorder.jobs) == 2, recorder.jobs
    log = shim.log()
    # Queued at creation, admitted, preempted (suspended again), admitted again.
    assert log.count("suspended, waiting to be admitted") >= 2 and log.count(" admitted\n") >= 2, log
    assert "was lost" not in log and "requeueing" not in log and "PodPendingTimeout" not in log


def settled(taskapp, cluster, namespace: str) -> bool:
    """Every message acked, and no Job left."""
    client = taskapp.store()
    settled.last = {"unacked": client.hlen("unacked"), "queued": client.llen("kubernetes"),
                    "jobs": [job["metadata"]["name"] for job in jobs_in(cluster, namespace)]}
    return not any(settled.last.values())


def runs(taskapp, key: str) -> int:
    return int(taskapp.store().get(f"runs:{key}") or 0)


def workload_of(cluster, namespace: str, job_name: str) -> dict:
    return wait_until(lambda: next((w for w in cluster.kueue.workloads(namespace)
                                    if any(o["name"] == job_name for o in w["metadata"]["ownerReferences"])), None),
                      message=f"the Workload of Job {job_name}")


def test_a_task_whose_workload_kueue_deactivates_fails_with_kueues_reason(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    """Kueue deactivates a Workload admitted longer than its maximum execution time (as it
    does after its requeue limit): it stops the Job and will not admit it again."""
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim(job_labels={"kueue.x-k8s.io/max-exec-time-seconds": "3"})
    result = taskapp.count.delay("overtime", 60)
    with pytest.raises(WorkloadDeactivated, match="deactivated Workload job-kc-.*maximum execution time"):
        result.get(timeout=60)
    wait_until(lambda: settled(taskapp, k8s_kueue_cluster, kueue_namespace), timeout=30,
               message=lambda: f"the message acked and the Job deleted; last: {settled.last}")
    assert runs(taskapp, "overtime") == 0
    assert "was lost" not in shim.log() and "requeueing" not in shim.log()


def test_a_task_whose_pod_is_never_ready_fails_when_kueue_deactivates_it_at_its_requeue_limit(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    """Kueue (waitForPodsReady: 15 s, backoffLimitCount 1) evicts an admitted Workload whose
    pod is not ready in time and queues it again; the second time, it deactivates it. Each
    eviction suspends the same Job, which the worker follows; the deactivation fails the task."""
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    # No scheduler binds the pods: every admission runs out of time.
    shim = start_queued_shim(pod_spec={"schedulerName": "no-such-scheduler"},
                             env={"K8S_CELERY_PENDING_TIMEOUT": "120"})
    with JobRecorder(k8s_kueue_cluster, kueue_namespace) as recorder:
        result = taskapp.count.delay("never-ready")
        with pytest.raises(WorkloadDeactivated, match="deactivated Workload job-kc-.*: The workload is deactivated "
                                                      "due to exceeding the maximum number of re-queuing retries"):
            result.get(timeout=120)
    assert len(recorder.jobs) == 1 and all(len(names) == 1 for names in recorder.jobs.values()), recorder.jobs
    wait_until(lambda: settled(taskapp, k8s_kueue_cluster, kueue_namespace), timeout=30,
               message=lambda: f"the message acked and the Job deleted; last: {settled.last}")
    log = shim.log()
    assert log.count(" admitted\n") >= 2, log  # admitted, evicted (suspended again), admitted again
    assert "was lost" not in log and "requeueing" not in log and "PodPendingTimeout" not in log
    assert runs(taskapp, "never-ready") == 0


def test_queued_tasks_deactivated_or_revoked_end_at_once_and_never_run(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim()
    busy = taskapp.count.delay("busy", 60)  # holds the quota until it is revoked
    running_pod_of(k8s_kueue_cluster, kueue_namespace, busy.id)
    deactivated, revoked = taskapp.count.delay("deactivated"), taskapp.count.delay("revoked")
    jobs = wait_until(lambda: (lambda found: found if len(found) == 3 else None)(
        {job["metadata"]["annotations"]["k8s-celery.io/task-id"]: job for job in jobs_in(k8s_kueue_cluster,
                                                                                            kueue_namespace)}),
        message="three Jobs")
    assert jobs[deactivated.id]["spec"]["suspend"] and jobs[revoked.id]["spec"]["suspend"]
    inspect = taskapp.app.control.inspect(destination=[shim.hostname], timeout=5)

    def two_suspended() -> dict | None:
        pool = ((inspect.stats() or {}).get(shim.hostname) or {}).get("pool") or {}
        return pool if pool.get("suspended") == 2 else None
    pool = wait_until(two_suspended, message="two suspended Jobs in the pool's stats")
    assert {job["id"]: job["phase"] for job in pool["jobs"]}.get(revoked.id) == "Suspended"
    assert revoked.id in str(inspect.reserved()) and revoked.id not in str(inspect.active())
    # An operator deactivates a queued Workload: nothing changes on its Job, the Workload watch sees it.
    workload = workload_of(k8s_kueue_cluster, kueue_namespace, jobs[deactivated.id]["metadata"]["name"])
    path = f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{kueue_namespace}/workloads/{workload['metadata']['name']}"
    k8s_kueue_cluster.api.patch(path, {"spec": {"active": False}}, strategy="merge-patch")
    with pytest.raises(WorkloadDeactivated, match=f"Kueue deactivated Workload {workload['metadata']['name']}"):
        deactivated.get(timeout=30)
    assert not busy.ready(), "a deactivated queued task fails without waiting for the quota"
    for task in (revoked, busy):  # the queued one first: the quota stays taken
        task.revoke(terminate=True)
        wait_until(lambda: task.state == "REVOKED", timeout=30, message="REVOKED")
    wait_until(lambda: settled(taskapp, k8s_kueue_cluster, kueue_namespace), timeout=30,
               message=lambda: f"every message acked and every Job deleted; last: {settled.last}")
    assert runs(taskapp, "deactivated") == 0 and runs(taskapp, "revoked") == 0 and runs(taskapp, "busy") == 0


def test_a_task_naming_a_missing_local_queue_fails_at_the_admission_timeout_with_kueues_reason(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    shim = start_queued_shim(env={"K8S_CELERY_ADMISSION_TIMEOUT": "6"})
    result = taskapp.misqueued.delay()  # its kubernetes option names the LocalQueue no-such-queue
    with pytest.raises(PodPendingTimeout, match=r"not admitted \(still suspended\) after \d+s "
                                                r"\(K8S_CELERY_ADMISSION_TIMEOUT\); Kueue: LocalQueue "
                                                r"no-such-queue doesn't exist"):
        result.get(timeout=60)
    assert "not admitted yet; Kueue: LocalQueue no-such-queue doesn't exist" in shim.log()
    wait_until(lambda: settled(taskapp, k8s_kueue_cluster, kueue_namespace), timeout=30,
               message=lambda: f"the message acked and the Job deleted; last: {settled.last}")


def test_a_worker_killed_with_queued_tasks_is_followed_by_one_that_adopts_their_jobs(
        start_queued_shim, taskapp, k8s_kueue_cluster, kueue_namespace):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    first = start_queued_shim(env=SHORT_VISIBILITY)
    with JobRecorder(k8s_kueue_cluster, kueue_namespace) as recorder:
        results = [taskapp.count.delay(f"adopted-{i}", 2) for i in range(3)]
        wait_until(lambda: sum(1 for job in jobs_in(k8s_kueue_cluster, kueue_namespace)
                               if job["spec"].get("suspend")) >= 2, message="two Jobs queued in Kueue")
        first.kill(signal.SIGKILL)
        second = start_queued_shim(env=SHORT_VISIBILITY)
        assert [result.get(timeout=60 + RESTORE_SECONDS) for result in results] == [1, 1, 1]
        wait_until(lambda: settled(taskapp, k8s_kueue_cluster, kueue_namespace), timeout=80 + RESTORE_SECONDS,
                   message=lambda: f"the redelivered messages acked; last: {settled.last}")
    assert [runs(taskapp, f"adopted-{i}") for i in range(3)] == [1, 1, 1]
    assert all(len(names) == 1 for names in recorder.jobs.values()) and len(recorder.jobs) == 3, recorder.jobs
    assert second.log().count("adopting running Job") + second.log().count("already ran in Job") >= 2, second.log()


def test_check_says_whether_the_local_queue_of_each_manifest_exists(k8s_kueue_cluster, kueue_namespace, tmp_path):
    queues(k8s_kueue_cluster, kueue_namespace, cpus=1)
    grant(k8s_kueue_cluster, kueue_namespace, "shim")
    answers = {}
    for local_queue in ("tasks", "absent"):
        directory = tmp_path / local_queue
        write_manifest(directory, "kubernetes", "redis://broker:6379/0", job_labels={QUEUE_LABEL: local_queue})
        done = run_check(k8s_kueue_cluster, kueue_namespace, "shim", directory, tmp_path)
        answers[local_queue] = done.returncode, [line for line in done.stdout.splitlines()
                                                 if line[6:].startswith("LocalQueue")]
    assert answers["tasks"] == (0, [f"PASS  LocalQueue tasks of queue kubernetes: exists in namespace "
                                    f"{kueue_namespace}"])
    assert answers["absent"] == (1, [f"FAIL  LocalQueue absent of queue kubernetes: LocalQueue absent does not exist "
                                     f"in namespace {kueue_namespace}: Kueue would hold the Jobs suspended"])
