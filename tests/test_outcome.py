"""Termination-message outcomes and the classification of Job/pod states."""

from __future__ import annotations

import json
import logging

from k8s_celery import outcome as o


def pod(phase: str, message: str | None = None, reason: str | None = None, **status) -> dict:
    terminated = {"exitCode": 0 if phase == "Succeeded" else 1}
    if message is not None:
        terminated["message"] = message
    if reason:
        terminated["reason"] = reason
    return {"metadata": {"name": "p"}, "status": {"phase": phase, **status,
                                                  "containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_round_trip():
    original = o.Outcome(o.FAILURE, runtime=1.5, exc_type="ValueError", exc_module="builtins",
                         exc_args=["boom"], traceback="Traceback...\nValueError: boom")
    decoded = o.decode(o.encode(original))
    assert decoded == original
    assert decoded.exception == {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": ["boom"]}


def test_encoding_fits_the_kubelet_limit_and_keeps_the_traceback_tail():
    tb = "".join(f"  line {i}\n" for i in range(2000)) + "ValueError: the end"
    text = o.encode(o.Outcome(o.FAILURE, exc_type="ValueError", exc_args=["x" * 10000], traceback=tb,
                              result="r" * 10000))
    assert len(text.encode()) <= o.MESSAGE_LIMIT
    decoded = o.decode(text)
    assert decoded.state == o.FAILURE and decoded.traceback.endswith("ValueError: the end")


def test_foreign_messages_are_not_outcomes():
    assert o.decode(None) is None and o.decode("done") is None
    assert o.decode(json.dumps({"v": 2, "s": "SUCCESS"})) is None


def test_pod_outcome_wins():
    message = o.encode(o.Outcome(o.SUCCESS, result="3"))
    assert o.classify({}, pod("Succeeded", message)).result == "3"


def test_deadline_is_a_time_limit():
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                      "message": "Job was active longer than specified deadline"}]}}
    assert o.classify(job, pod("Failed", reason="Error")).state == o.TIME_LIMIT


def test_lost_pods():
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    evicted = pod("Failed", reason="Error", reason_unused=None)
    evicted["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    lost = o.classify(failed, evicted)
    assert lost.state == o.LOST and "Evicted" in lost.reason
    assert "OOMKilled" in o.classify(failed, pod("Failed", reason="OOMKilled")).reason
    assert o.classify(None, None, job_deleted=True).reason == "the Job was deleted"


def test_running_is_not_over():
    assert o.classify({"status": {}}, {"status": {"phase": "Running"}}) is None


def test_pending_reasons():
    waiting = {"status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}}
    assert o.pending_reason(waiting) == "ErrImagePull: not found"
    unschedulable = {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]}}
    assert o.pending_reason(unschedulable) == "Unschedulable: 0/1 nodes"
    assert o.pending_reason(None) == "no pod was created for the Job"


def sidecar_pod(task_state: dict, phase: str = "Running") -> dict:
    """A pod whose sidecar sorts before the task container, as the kubelet reports it."""
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "task"}, {"name": "aaa-proxy"}]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "aaa-proxy", "state": {"running": {}}}, {"name": "task", "state": task_state}]}}


def test_the_task_container_is_found_by_name():
    message = o.encode(o.Outcome(o.SUCCESS, result="5"))
    done = sidecar_pod({"terminated": {"exitCode": 0, "message": message}})
    assert o.classify({"status": {}}, done).result == "5", "reported while the sidecar still runs"
    crashed = sidecar_pod({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    assert o.classify({"status": {}}, crashed).state == o.LOST
    assert o.classify({"status": {}}, sidecar_pod({"running": {}})) is None


def test_a_deadline_is_seen_as_soon_as_the_job_controller_decides():
    target = {"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}]}}
    assert o.classify(target, {"status": {"phase": "Running"}}).state == o.TIME_LIMIT
    assert o.job_finished(target)
    other = {"status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    assert o.classify(other, {"status": {"phase": "Running"}}) is None and o.job_finished(other)


def test_a_completed_job_whose_pod_is_gone_is_flagged():
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    lost = o.classify(complete, None)
    assert lost.state == o.LOST and lost.job_completed


def test_runner_flags_survive_the_trip():
    decoded = o.decode(o.encode(o.Outcome(o.FAILURE, not_run=True, soft_limit_hit=True)))
    assert decoded.not_run and decoded.soft_limit_hit


def test_the_result_backend_answers_what_it_stored():
    from celery import Celery

    app = Celery("stored", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.backend.store_result("t-1", {"rows": [1, 2]}, "SUCCESS")
    meta = o.stored_meta(app, "t-1")
    assert meta["status"] == "SUCCESS"
    assert o.stored_success(meta) == o.Outcome(o.SUCCESS, result="{'rows': [1, 2]}")
    assert o.stored_meta(app, "never-stored")["status"] == "PENDING"


def test_a_result_backend_that_cannot_answer_reads_as_nothing_stored(caplog):
    class Unreachable:
        @property
        def backend(self):
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    assert o.stored_meta(Unreachable(), "t-1") == {}
    assert not caplog.records
    assert o.stored_meta(Unreachable(), "t-1", logging.getLogger("k8s_celery.pool")) == {}
    assert "cannot read the state of t-1 from the result backend: Error 111" in caplog.text


def test_a_pod_that_ends_while_its_job_is_suspended_was_preempted_not_lost():
    suspended = {"spec": {"suspend": True}, "status": {}}
    sigtermed = pod("Failed", reason="Error")
    assert o.classify(suspended, sigtermed) is None  # Kueue resumes the Job with a new pod
    assert o.classify(suspended, None) is None       # queued, no pod yet
    reported = o.encode(o.Outcome(o.SUCCESS, result="3"))
    assert o.classify(suspended, pod("Succeeded", reported)).result == "3"  # it ended first: its outcome
    assert o.classify(suspended, sigtermed, job_deleted=True).state == o.LOST
    failed = {"spec": {"suspend": True}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    assert o.classify(failed, sigtermed).state == o.LOST
    assert o.job_suspended(suspended) and not o.job_suspended({"spec": {}}) and not o.job_suspended(None)


def test_a_pod_stopped_by_its_jobs_suspension_is_preempted_even_when_its_end_is_seen_after_the_resume():
    old = pod("Failed", reason="Error")
    old["metadata"].update(uid="old", creationTimestamp="2026-12-05T03:07:01Z")
    resumed = {"status": {"conditions": [{"type": "Suspended", "status": "False",
                                          "lastTransitionTime": "2026-12-05T03:07:04Z"}]}}
    assert o.preempted(resumed, old, set())                  # created before the last resume
    assert o.preempted({"status": {}}, old, {"old"})         # seen when its Job was suspended
    assert not o.preempted({"status": {}}, old, set())       # never suspended: lost
    new = pod("Failed", reason="Error")
    new["metadata"].update(uid="new", creationTimestamp="2026-12-05T03:07:05Z")
    assert not o.preempted(resumed, new, {"old"})            # the resumed run's own end
    finished = pod("Succeeded", o.encode(o.Outcome(o.SUCCESS, result="1")))
    finished["metadata"].update(uid="old", creationTimestamp="2026-12-05T03:07:01Z")
    assert not o.preempted(resumed, finished, {"old"})       # it reported: its outcome stands
    assert not o.preempted(resumed, None, set())


def test_a_pod_waits_for_its_payload_secret_only_on_the_kubelet_s_config_error_naming_it():
    def pod(reason, message):
        return {"spec": {"containers": [{"name": "task"}]},
                "status": {"containerStatuses": [{"name": "task", "state": {
                    "waiting": {"reason": reason, "message": message}}}]}}

    assert o.waits_for_secret(pod("CreateContainerConfigError", 'secret "kc-1-abc" not found'), "kc-1-abc")
    assert not o.waits_for_secret(pod("CreateContainerConfigError", 'secret "other" not found'), "kc-1-abc")
    assert not o.waits_for_secret(pod("CreateContainerConfigError", 'configmap "kc-1-abc" not found'), "kc-1-abc")
    assert not o.waits_for_secret(pod("ContainerCreating", ""), "kc-1-abc")
    assert not o.waits_for_secret(None, "kc-1-abc")
