"""The pod status the process kubelet reports, built from container runs."""

from __future__ import annotations

from pathlib import Path

from k8s_celery.testing.kubelet.faults import PodFault
from k8s_celery.testing.kubelet.process import ContainerRun
from k8s_celery.testing.kubelet.status import (container_statuses, pod_status, terminated_state,
                                               termination_message, waiting_statuses)

CONTAINERS = [{"name": "task", "image": "app:1"}, {"name": "aaa-proxy", "image": "proxy:1"}]


def ended_run(tmp_path: Path, name: str, exit_code: int | None, message: str = "", log: str = "") -> ContainerRun:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "termination-log").write_text(message)
    (run_dir / "log").write_text(log)
    run = ContainerRun(name, None, run_dir / "log", run_dir / "termination-log", "2026-01-01T00:00:00Z")
    run.exit_code = exit_code
    run.finished_at = "2026-01-01T00:00:05Z" if exit_code is not None else None
    return run


def test_waiting_statuses_are_sorted_by_name():
    statuses = waiting_statuses(CONTAINERS, "ErrImagePull", "no such image")["containerStatuses"]
    assert [s["name"] for s in statuses] == ["aaa-proxy", "task"]
    assert statuses[1] == {"name": "task", "image": "app:1", "imageID": "", "ready": False, "started": False,
                           "restartCount": 0,
                           "state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}}}
    assert waiting_statuses(CONTAINERS, "ContainerCreating")["containerStatuses"][0]["state"] == \
        {"waiting": {"reason": "ContainerCreating"}}


def test_terminated_state_reasons(tmp_path):
    ok, failed = ended_run(tmp_path, "ok", 0), ended_run(tmp_path, "failed", 1)
    assert terminated_state(ok, None, "done") == {
        "exitCode": 0, "reason": "Completed", "startedAt": "2026-01-01T00:00:00Z",
        "finishedAt": "2026-01-01T00:00:05Z", "containerID": "process://0", "message": "done"}
    assert terminated_state(failed, None, "")["reason"] == "Error"
    assert "message" not in terminated_state(failed, None, "")
    assert terminated_state(failed, PodFault("oom", "OOMKilled"), "")["reason"] == "OOMKilled"
    assert terminated_state(failed, PodFault("evict", "Evicted"), "")["reason"] == "Error"


def test_a_run_that_never_reported_an_exit_code_ends_as_137(tmp_path):
    run = ended_run(tmp_path, "gone", None)
    state = terminated_state(run, PodFault("evict", "Evicted"), "")
    assert (state["exitCode"], state["reason"]) == (137, "ContainerStatusUnknown")
    assert state["finishedAt"].endswith("Z")


def test_termination_message_sources(tmp_path):
    run = ended_run(tmp_path, "task", 1, log="".join(f"line {i}\n" for i in range(100)))
    container = {"name": "task", "terminationMessagePolicy": "FallbackToLogsOnError"}
    fallback = termination_message(run, container, None)
    assert fallback.splitlines() == [f"line {i}" for i in range(20, 100)]  # the last 80 lines
    assert termination_message(run, {"name": "task"}, None) == ""  # policy File: the empty file
    assert termination_message(run, container, PodFault("crash", "Error")) == ""
    assert termination_message(run, container, None, simulated_message="simulated") == "simulated"


def test_container_statuses_sorted_with_running_waiting_and_terminated(tmp_path):
    task = ended_run(tmp_path, "task", 3)
    proxy = ended_run(tmp_path, "aaa-proxy", None)
    statuses = container_statuses(
        CONTAINERS, {"task": task, "aaa-proxy": proxy}, {"task": 2}, {"task": {"terminated": {"exitCode": 1}}},
        lambda run, container: {"exitCode": run.exit_code, "of": container["name"]})["containerStatuses"]
    assert statuses == [
        {"name": "aaa-proxy", "image": "proxy:1", "imageID": "", "restartCount": 0, "ready": True,
         "started": True, "containerID": "process://0",
         "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
        {"name": "task", "image": "app:1", "imageID": "", "restartCount": 2,
         "lastState": {"terminated": {"exitCode": 1}}, "ready": False, "started": False,
         "state": {"terminated": {"exitCode": 3, "of": "task"}}}]
    [waiting, _] = container_statuses(CONTAINERS, {}, {}, {}, None)["containerStatuses"]
    assert waiting["state"] == {"waiting": {"reason": "PodInitializing"}}


def condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == kind), None)


def test_pod_status_running_is_ready():
    status = pod_status("Running", "2026-01-01T00:00:00Z", None, {"containerStatuses": []})
    assert [c["type"] for c in status["conditions"]] == [
        "PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"]
    assert condition(status, "Ready")["status"] == "True"
    assert (status["phase"], status["podIP"], status["startTime"]) == ("Running", "127.0.0.1",
                                                                       "2026-01-01T00:00:00Z")
    assert "reason" not in status


def test_an_evicted_pod_is_a_disruption_target_with_the_eviction_reason():
    fault = PodFault("evict", "Evicted", "The node was low on resource: memory. ")
    running = pod_status("Running", "t", fault, {})
    assert condition(running, "DisruptionTarget")["reason"] == "TerminationByKubelet"
    assert "reason" not in running  # only once Failed
    failed = pod_status("Failed", "t", fault, {})
    assert condition(failed, "Ready")["status"] == "False"
    assert (failed["reason"], failed["message"]) == ("Evicted", fault.message)


def test_a_deadline_fails_the_pod_without_a_disruption_target():
    fault = PodFault("deadline", "DeadlineExceeded", "too long")
    status = pod_status("Failed", "t", fault, {})
    assert condition(status, "DisruptionTarget") is None
    assert (status["reason"], status["message"]) == ("DeadlineExceeded", "too long")
    assert "reason" not in pod_status("Failed", "t", PodFault("oom", "OOMKilled"), {})
