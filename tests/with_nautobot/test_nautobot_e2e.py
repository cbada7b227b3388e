"""Nautobot's Jobs, unchanged, on k8s-celery: the real Nautobot from PyPI on a real
PostgreSQL and Redis, Jobs enqueued as Nautobot's UI enqueues them (``JobResult.enqueue_job``
on a Celery JobQueue), each run in a pod of its own (``tox -e nautobot``)."""

from __future__ import annotations

import pytest

from conftest import jobs_in
from k8s_celery.testing import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.nautobot]

#: The JobLogEntry rows of a run of "Log and return" (level, message, object), as Nautobot's
#: own prefork worker writes them: Nautobot's lines around the run, the Job's own at each
#: level (Nautobot's success and failure too), the object reference, the printed line
#: (Celery redirects stdout to the task logger at WARNING, Nautobot stores it).
LOGGED = [("info", "Running job (source version: unknown)", "Log and return"), ("debug", "debug hello", ""),
          ("info", "info hello", ""), ("success", "success hello", ""), ("warning", "warning hello", ""),
          ("failure", "failure hello", ""), ("info", "about an object", "Active"), ("warning", "printed hello", ""),
          ("success", "Job completed", "")]


def pods_of(site) -> list[dict]:
    from k8s_celery.cluster import collection_path

    pods, _ = site.cluster.api.list(collection_path("pods", site.namespace))
    return pods


def test_a_jobs_log_reaches_joblogentry_in_a_pod_as_under_nautobots_prefork_worker(nautobot_site):
    nautobot_site.start_shim()
    in_pod = nautobot_site.enqueue("LogAndReturn", word="hello")
    result = nautobot_site.job_result(in_pod)
    assert result["status"] == "SUCCESS", result
    assert result["result"].startswith("returned hello from kc-"), result  # the pod's hostname
    pod_entries = nautobot_site.log_entries(in_pod)

    nautobot_site.start_prefork_worker("prefork-jobs")
    in_prefork = nautobot_site.enqueue("LogAndReturn", queue="prefork-jobs", word="hello")
    assert nautobot_site.job_result(in_prefork)["status"] == "SUCCESS"
    prefork_entries = nautobot_site.log_entries(in_prefork)

    assert prefork_entries == LOGGED
    assert pod_entries == LOGGED


def test_a_failing_job_ends_failure_with_its_traceback_and_its_log(nautobot_site):
    nautobot_site.start_shim()
    broken = nautobot_site.enqueue("Broken")
    result = nautobot_site.job_result(broken)
    assert result["status"] == "FAILURE"
    assert "RuntimeError: this job is broken" in result["traceback"]
    assert ("info", "about to break") in [(level, message) for level, message, _ in
                                           nautobot_site.log_entries(broken)]


def test_nautobot_server_celery_worker_runs_jobs_in_pods_with_the_pool(nautobot_site):
    """As Nautobot users start their workers: ``nautobot-server celery worker -P custom`` with
    CELERY_CUSTOM_WORKER_POOL; the pods load Nautobot through ``k8s_celery.contrib.nautobot``
    without K8S_CELERY_APP being set."""
    shim = nautobot_site.start_shim(nautobot_server=True)
    job = nautobot_site.enqueue("LogAndReturn", word="served")
    result = nautobot_site.job_result(job)
    assert result["status"] == "SUCCESS" and "returned served from kc-" in result["result"], result
    assert ("success", "success served") in [(level, message) for level, message, _ in
                                              nautobot_site.log_entries(job)]
    assert f"-> Job {nautobot_site.namespace}/kc-" in shim.log()


def test_a_job_whose_pod_is_evicted_runs_again_and_succeeds(nautobot_site):
    """What nautobot#9461 leaves PENDING forever with Nautobot's own Kubernetes jobs."""
    shim = nautobot_site.start_shim()
    job = nautobot_site.enqueue("Sleeper", seconds=4)
    running = nautobot_site.job_result(job, states=("STARTED",), timeout=90)  # Nautobot shows it running
    assert running["date_started"] is not None
    pod = running_pod(nautobot_site)
    nautobot_site.cluster.kubelet.evict(nautobot_site.namespace, pod)
    result = nautobot_site.job_result(job, timeout=120)
    assert result["status"] == "SUCCESS" and result["result"] == "slept 4", result
    assert result["worker"] != pod  # the second attempt's pod
    wait_until(lambda: "attempt 1 was lost (pod Evicted" in shim.log(), timeout=30,
               message="the lost attempt's relayed output")  # written by the relay's own thread
    # Both attempts logged their start into the same JobResult; the second one ended it.
    messages = [message for _, message, _ in nautobot_site.log_entries(job)]
    assert messages.count("sleeping 4 s") == 2 and messages[-1] == "Job completed", messages


def test_a_job_cancelled_from_nautobot_has_its_kubernetes_job_deleted(nautobot_site):
    """Nautobot's cancel asks the workers whether they hold the task (``query_task``), then
    revokes it with ``terminate=True``: the shim answers as a prefork worker and deletes the Job."""
    nautobot_site.start_shim()
    job = nautobot_site.enqueue("Sleeper", seconds=300)
    nautobot_site.job_result(job, states=("STARTED",), timeout=90)
    running_pod(nautobot_site)
    assert nautobot_site.cancel(job) == {"liveness": "RUNNING", "canceled": True, "error": None}
    assert nautobot_site.job_result(job, timeout=60)["status"] == "REVOKED"
    wait_until(lambda: not jobs_in(nautobot_site.cluster, nautobot_site.namespace), timeout=60,
               message="the Kubernetes Job deleted")
    assert nautobot_site.sql("SELECT cancel_type FROM extras_jobresult WHERE id = %s", (job,)) == [("terminated",)]
    messages = [message for _, message, _ in nautobot_site.log_entries(job)]
    assert f"Job {job} terminated by admin" in messages, messages


def test_a_job_scheduled_in_nautobot_runs_in_a_pod_when_nautobots_beat_sends_it(nautobot_site):
    nautobot_site.start_shim()
    scheduled = nautobot_site.schedule("LogAndReturn", seconds=3, word="scheduled")
    beat_log = nautobot_site.start_beat()
    [(result_id,)] = wait_until(lambda: nautobot_site.sql(
        "SELECT id FROM extras_jobresult WHERE scheduled_job_id = %s", (scheduled,)), timeout=90,
        message=lambda: f"a JobResult of the scheduled Job:\n{beat_log.read_text(errors='replace')[-3000:]}")
    result = nautobot_site.job_result(str(result_id))
    assert result["status"] == "SUCCESS" and result["result"].startswith("returned scheduled from kc-"), result
    assert "Scheduler: Sending due task LogAndReturn in 3 s" in beat_log.read_text(errors="replace")


def running_pod(site) -> str:
    """The name of the (only) running pod of the test's namespace."""
    [pod] = wait_until(lambda: [p for p in pods_of(site) if p["status"].get("phase") == "Running"] or None,
                       message="the Job's pod running")
    return pod["metadata"]["name"]
