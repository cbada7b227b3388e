"""The pod side: the runner executes the task with Celery's tracer and reports it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
from kombu.serialization import dumps

from k8s_celery import outcome as o

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
