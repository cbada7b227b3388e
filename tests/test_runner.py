"""The pod side: the runner executes the task with Celery's tracer and reports it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kombu.serialization import dumps

from k8s_celery import outcome as o
from k8s_celery.manifest import PAYLOAD_ENV

from conftest import APPS


@pytest.fixture
def app():
    return "taskapp"


def write_payload(tmp_path, task: str, args: list, **extra) -> str:
    content_type, encoding, body = dumps([args, {}, {}], serializer="json")
    payload = {"version": 1, "task": task, "id": "t-1", "queue": "kubernetes",
               "request": {"id": "t-1", "task": task, "delivery_info": {"routing_key": "kubernetes"}},
               "body": base64.b64encode(body.encode() if isinstance(body, str) else body).decode(),
               "content_type": content_type, "content_encoding": encoding, **extra}
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    return str(path)


ENV = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": "memory://",
       "CELERY_RESULT_BACKEND": "cache+memory://"}


def run_task(payload: str, app: str, log) -> int:
    """`k8s-celery run-task` in its own process, as in a pod."""
    return subprocess.run([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--payload", payload,
                           "--termination-log", str(log)], env=ENV, timeout=60).returncode


def run(tmp_path, app, task, args, **extra):
    log = tmp_path / "termination-log"
    code = run_task(write_payload(tmp_path, task, args, **extra), app, log)
    return code, o.decode(log.read_text())


def test_success(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.add", [2, 3])
    assert code == 0 and outcome.state == o.SUCCESS and outcome.result == "5"


def test_the_payload_in_the_environment_is_read_and_not_inherited(tmp_path, app):
    """As the pod gets it: the kubelet fills K8S_CELERY_PAYLOAD_JSON from the payload Secret.
    The task (``taskapp.child_environment``) runs a subprocess that must not see it."""
    payload = (tmp_path / "payload.json")
    log = tmp_path / "termination-log"
    text = Path(write_payload(tmp_path, "taskapp.child_environment", [PAYLOAD_ENV])).read_text()
    payload.unlink()
    code = subprocess.run([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--termination-log", str(log)],
                          env={**ENV, PAYLOAD_ENV: text}, timeout=60).returncode
    outcome = o.decode(log.read_text())
    assert code == 0 and outcome.state == o.SUCCESS and outcome.result == repr(None)


def test_an_empty_payload_in_the_environment_fails_the_task_saying_so(tmp_path, app):
    log = tmp_path / "termination-log"
    code = subprocess.run([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--termination-log", str(log)],
                          env={**ENV, PAYLOAD_ENV: ""}, timeout=60).returncode
    outcome = o.decode(log.read_text())
    assert code == 2 and outcome.state == o.FAILURE and outcome.not_run
    assert "is empty: this pod was given no payload" in outcome.traceback


def test_failure_carries_the_exception(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.fail", ["bad"])
    assert code == 1 and outcome.state == o.FAILURE
    assert (outcome.exc_type, outcome.exc_module, outcome.exc_args) == ("ValueError", "builtins", ["bad"])
    assert "raise ValueError(message)" in outcome.traceback


def test_reject(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.reject", [])
    assert code == 1 and outcome.state == o.REJECTED and outcome.requeue is False


def test_soft_time_limit_is_raised_in_the_task(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.soft_limited", [], soft_time_limit=0.3)
    assert outcome.state == o.SUCCESS and outcome.result == "'caught soft limit'"  # repr, as in events


def test_unknown_task_and_bad_payload(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.nope", [])
    assert code == 2 and outcome.exc_type == "NotRegistered"
    (tmp_path / "broken.json").write_text("{not json")
    log = tmp_path / "log2"
    assert run_task(str(tmp_path / "broken.json"), app, log) == 2
    assert o.decode(log.read_text()).state == o.FAILURE


@pytest.mark.parametrize("body, content_type, error, module", [
    (b"\x00not json", "application/json", "DecodeError", "kombu.exceptions"),
    (b"a: 1", "application/x-yaml", "ContentDisallowed", "kombu.exceptions"),  # not in accept_content
    (b"\x80\x04N.", "application/x-python-serialize", "TypeError", "builtins"),  # None, not (args, kwargs, embed)
])
def test_a_body_that_cannot_be_decoded_is_a_failure_the_worker_stores(tmp_path, app, body, content_type, error,
                                                                      module):
    """As a prefork pool process whose tracer cannot decode the body: the exception goes to the
    worker, which stores it, so the pod reports the task as not run."""
    code, outcome = run(tmp_path, app, "taskapp.add", [], body=base64.b64encode(body).decode(),
                        content_type=content_type)
    assert code == 2 and outcome.state == o.FAILURE and outcome.not_run
    assert (outcome.exc_type, outcome.exc_module) == (error, module)


def start_task(tmp_path, app, task, args, **extra) -> tuple[subprocess.Popen, object]:
    log = tmp_path / "termination-log"
    process = subprocess.Popen([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--payload",
                                write_payload(tmp_path, task, args, **extra), "--termination-log", str(log)],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, log


def wait_running(process) -> None:
    import time

    for line in process.stdout:
        if "running taskapp." in line:
            time.sleep(1)  # into the task's body: a signal sent earlier hits Celery's tracer
            return
    raise AssertionError("the task never started")


def test_sigterm_ends_the_task_without_an_outcome_as_in_a_pool_process(tmp_path, app):
    """As PID 1 of a container the runner gets no default signal actions: it must
    handle SIGTERM itself, as billiard's pool processes do (SystemExit in the task)."""
    import signal
    import time

    process, log = start_task(tmp_path, app, "taskapp.sleep", [30])
    wait_running(process)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(10)
    assert time.monotonic() - started < 5 and code != 0
    assert not log.exists() or not log.read_text(), "a terminated task reports no outcome (nothing was stored)"


def test_sigusr1_raises_the_soft_time_limit(tmp_path, app):
    import signal

    process, log = start_task(tmp_path, app, "taskapp.catch_soft", [30])
    wait_running(process)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(10) == 0
    assert o.decode(log.read_text()).result == "'caught soft limit'"


def test_soft_time_limit_hit_is_reported(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.catch_soft", [30], soft_time_limit=0.3)
    assert outcome.soft_limit_hit and outcome.result == "'caught soft limit'"
    code, outcome = run(tmp_path, app, "taskapp.add", [1, 1], soft_time_limit=5)
    assert not outcome.soft_limit_hit


def test_a_task_the_runner_cannot_run_is_flagged(tmp_path, app):
    code, outcome = run(tmp_path, app, "taskapp.nope", [])
    assert code == 2 and outcome.not_run and "not registered in the app" in outcome.exc_args[0]


def test_the_worker_signals_of_a_prefork_pool_process_are_sent(tmp_path, app, monkeypatch):
    signal_log = tmp_path / "signals"
    monkeypatch.setitem(ENV, "TASKAPP_SIGNAL_LOG", str(signal_log))
    code, outcome = run(tmp_path, app, "taskapp.add", [1, 2])
    assert outcome.state == o.SUCCESS
    assert signal_log.read_text().splitlines() == [
        "worker_init celery.concurrency.prefork:TaskPool", "worker_process_init", "worker_process_shutdown 0"]


def test_a_second_pod_of_the_same_job_does_not_run_the_task_again(tmp_path, app, redis_server):
    """Kubernetes may start a Job's pod twice; a task id reused by a later message runs."""
    from datetime import datetime, timedelta, timezone

    url = f"{redis_server.url}/3"
    redis_server.client(3).flushdb()
    env = {**ENV, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}
    launched = datetime.now(timezone.utc).isoformat()
    payload = write_payload(tmp_path, "taskapp.count", ["twice"], launched_at=launched)

    def pod() -> o.Outcome:
        log = tmp_path / "termination-log"
        subprocess.run([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--payload", payload,
                        "--termination-log", str(log)], env=env, timeout=60, check=True)
        return o.decode(log.read_text())

    assert pod().result == "1"
    assert pod().result == "1", "the second pod reports the first one's success"
    assert int(redis_server.client(3).get("runs:twice")) == 1
    later = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    payload = write_payload(tmp_path, "taskapp.count", ["twice"], launched_at=later)
    assert pod().result == "2", "a later message with the same task id runs"


def test_a_task_revoked_after_its_job_was_created_does_not_run(tmp_path, app, redis_server):
    """A revoke that reaches the Job while its pod starts: the pod does not run the task, REVOKED
    stays (a prefork worker discards a revoked task). A revoke of an earlier message does not count."""
    from datetime import datetime, timedelta, timezone

    from celery import Celery
    from celery.backends.redis import RedisBackend

    url = f"{redis_server.url}/4"
    redis_server.client(4).flushdb()
    env = {**ENV, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}
    # Built from the URL: an app's result_backend setting yields to $CELERY_RESULT_BACKEND,
    # which other tests of the session set.
    backend = RedisBackend(app=Celery("revoker"), url=url)
    launched = datetime.now(timezone.utc).isoformat()
    backend.mark_as_revoked("t-1", "terminated")

    def pod(launched_at: str) -> o.Outcome:
        log = tmp_path / "termination-log"
        payload = write_payload(tmp_path, "taskapp.count", ["revoked"], launched_at=launched_at)
        subprocess.run([sys.executable, "-m", "k8s_celery", "run-task", "-A", app, "--payload", payload,
                        "--termination-log", str(log)], env=env, timeout=60, check=True)
        return o.decode(log.read_text())

    skipped = pod(launched)
    assert skipped.state == o.IGNORED and skipped.result == "revoked before it started"
    assert redis_server.client(4).get("runs:revoked") is None, "the revoked task ran"
    assert backend.get_task_meta("t-1")["status"] == "REVOKED"
    later = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    assert pod(later).state == o.SUCCESS, "a later message with the same task id runs"
    assert int(redis_server.client(4).get("runs:revoked")) == 1
