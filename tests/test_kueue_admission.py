"""What the worker reads of Kueue's Workloads, and the clock of a Job in Kueue's queue (pure
logic; tests/test_kueue_e2e.py runs it against Kueue's real manager)."""

from __future__ import annotations

from k8s_celery.errors import PodPendingTimeout, WorkloadDeactivated
from k8s_celery.hub import LAUNCH_FAILED, PENDING_TIMEOUT
from k8s_celery.kueue import Admission, deactivation, slim_workload, task_error, waiting_reason
from test_deliveries import delivery


def workload(active: bool | None = None, **conditions: tuple[str, str, str]) -> dict:
    """A Workload as Kueue writes it; ``conditions``: type -> (status, reason, message)."""
    spec = {"queueName": "tasks", "podSets": []}
    if active is not None:
        spec["active"] = active
    return {"metadata": {"name": "job-kc-1-abcde", "uid": "w-1", "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "kc-1", "uid": "j-1", "controller": True}]},
            "spec": spec,
            "status": {"conditions": [{"type": kind, "status": status, "reason": reason, "message": message,
                                       "lastTransitionTime": "2026-12-05T00:00:00Z"}
                                      for kind, (status, reason, message) in conditions.items()]}}


DEACTIVATED = slim_workload(workload(active=False, Evicted=(
    "True", "DeactivatedDueToRequeuingLimitExceeded", "The workload is deactivated due to exceeding the maximum number of re-queuing retries")))


def test_a_workload_is_kept_under_its_job_with_what_says_why_it_waits():
    slim = slim_workload(workload(QuotaReserved=("False", "Inadmissible", "LocalQueue tasks doesn't exist"),
                                  PodsReady=("False", "PodsReady", "Not all pods are ready")))
    assert slim == {"name": "job-kc-1-abcde", "uid": "w-1", "jobUid": "j-1", "jobName": "kc-1", "active": True,
                    "conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Inadmissible",
                                    "message": "LocalQueue tasks doesn't exist"}]}
    assert waiting_reason(slim) == "Kueue: LocalQueue tasks doesn't exist"
    assert deactivation(slim) is None
    assert waiting_reason(slim_workload(workload(QuotaReserved=("True", "QuotaReserved", "Quota reserved")))) is None


def test_a_deactivated_workload_is_named_with_kueues_reason():
    assert deactivation(DEACTIVATED) == ("Kueue deactivated Workload job-kc-1-abcde: The workload is deactivated "
                                         "due to exceeding the maximum number of re-queuing retries")
    # Deactivated by hand while it was evicted for another reason: that reason is not the deactivation's.
    by_hand = slim_workload(workload(active=False, Evicted=("True", "Preempted", "Preempted to accommodate")))
    assert deactivation(by_hand) == "Kueue deactivated Workload job-kc-1-abcde"
    by_hand = slim_workload(workload(active=False, Evicted=("True", "Deactivated", "The workload is deactivated")))
    assert deactivation(by_hand) == "Kueue deactivated Workload job-kc-1-abcde: The workload is deactivated"
    # Kueue's own deactivation is seen (spec.active) before its eviction is written.
    targeted = slim_workload(workload(active=False, DeactivationTarget=(
        "True", "MaximumExecutionTimeExceeded", "exceeding the maximum execution time")))
    assert deactivation(targeted) == ("Kueue deactivated Workload job-kc-1-abcde: The workload is deactivated "
                                      "due to exceeding the maximum execution time")
    assert deactivation(None) is None


def queued(workloads: dict, timeout: float = 0.0):
    waiting = delivery("t-1")
    waiting.job_uid = "j-1"
    return waiting, Admission(workloads.get, timeout)


def test_a_queued_job_waits_without_a_deadline_until_kueue_deactivates_it():
    workloads: dict = {}
    waiting, admission = queued(workloads)
    assert admission.waiting(waiting, now=100.0) is None and waiting.queued_since == 100.0
    assert admission.waiting(waiting, now=100000.0) is None  # no admission timeout by default
    workloads["j-1"] = DEACTIVATED
    result = admission.waiting(waiting, now=100001.0)
    assert result.state == LAUNCH_FAILED and "re-queuing retries" in result.reason
    assert isinstance(task_error(result), WorkloadDeactivated)


def test_the_admission_timeout_names_what_kueue_said_and_restarts_at_each_suspension():
    workloads = {"j-1": slim_workload(workload(QuotaReserved=("False", "Inadmissible",
                                                              "LocalQueue missing doesn't exist")))}
    waiting, admission = queued(workloads, timeout=30.0)
    assert admission.waiting(waiting, now=0.0) is None
    assert waiting.admission_note == "Kueue: LocalQueue missing doesn't exist"
    admission.admitted(waiting, now=20.0)
    assert waiting.queued_since is None and waiting.job_seen_at == 20.0  # the pending timeout starts here
    assert admission.waiting(waiting, now=25.0) is None  # preempted: a new wait
    assert admission.waiting(waiting, now=50.0) is None
    result = admission.waiting(waiting, now=56.0)
    assert result.state == PENDING_TIMEOUT
    assert result.reason == (f"Job {waiting.job_name} not admitted (still suspended) after 31s "
                             "(K8S_CELERY_ADMISSION_TIMEOUT); Kueue: LocalQueue missing doesn't exist")
    assert isinstance(task_error(result), PodPendingTimeout)


def test_a_job_waiting_for_quota_is_noted_at_info_one_kueue_cannot_admit_at_warning(caplog):
    pending = slim_workload(workload(QuotaReserved=("False", "Pending", "couldn't assign flavors to pod set main: "
                                                                       "insufficient quota for cpu in flavor default")))
    missing = slim_workload(workload(QuotaReserved=("False", "Inadmissible", "LocalQueue tasks doesn't exist")))
    workloads = {"j-1": pending}
    waiting, admission = queued(workloads)
    with caplog.at_level("INFO", logger="k8s_celery.pool"):
        admission.waiting(waiting, now=0.0)
        workloads["j-1"] = missing
        admission.waiting(waiting, now=1.0)
        admission.waiting(waiting, now=2.0)  # the same reason: said once
    notes = [(record.levelname, record.getMessage().split("; ", 1)[1]) for record in caplog.records
             if "not admitted yet" in record.getMessage()]
    assert notes == [("INFO", "Kueue: couldn't assign flavors to pod set main: insufficient quota for cpu in "
                              "flavor default"),
                     ("WARNING", "Kueue: LocalQueue tasks doesn't exist")]
