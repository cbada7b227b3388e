"""The Celery app the end-to-end tests run, in the shim and in the pods."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.worker.control import control_command

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("taskapp", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(
    task_routes={"taskapp.local_*": {"queue": "default"}},
    task_default_queue="kubernetes",
    result_extended=True,
    task_track_started=True,
    broker_connection_retry_on_startup=True,
    task_serializer=os.environ.get("TASKAPP_SERIALIZER", "json"),
    result_serializer=os.environ.get("TASKAPP_SERIALIZER", "json"),
    accept_content=["json", "pickle"],
    result_accept_content=["json", "pickle"],
    broker_transport_options={"visibility_timeout": float(os.environ.get("TASKAPP_VISIBILITY_TIMEOUT", 3600)),
                              # sweep for abandoned messages every second (default: ~100 s)
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
)


if os.environ.get("TASKAPP_BEAT"):
    app.conf.beat_schedule = {"count-every-2s": {"task": "taskapp.count", "schedule": 2.0,
                                                 "args": ("beat",)}}


def store() -> redis.Redis:
    return redis.Redis.from_url(BROKER)


@app.task(name="taskapp.add")
def add(x, y):
    return x + y


@app.task(name="taskapp.tsum")
def tsum(numbers):
    return sum(numbers)


@app.task(name="taskapp.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="taskapp.count")
def count(key, sleep=0.0):
    """Sleep, then count a completed run of this key (how often the task ran to its end)."""
    time.sleep(sleep)
    return store().incr(f"runs:{key}")


@app.task(name="taskapp.retry_once", bind=True)
def retry_once(self, key):
    if store().incr(f"attempts:{key}") == 1:
        raise self.retry(countdown=1)
    return "retried"


@app.task(name="taskapp.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="taskapp.soft_limited", soft_time_limit=1)
def soft_limited():
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        return "caught soft limit"
    return "not interrupted"


@app.task(name="taskapp.hard_limited", time_limit=2)
def hard_limited():
    time.sleep(60)


@app.task(name="taskapp.reject")
def reject():
    raise Reject("no thanks", requeue=False)


@app.task(name="taskapp.echo")
def echo(value):
    return value


@app.task(name="taskapp.resources", kubernetes={
    "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}},
    "nodeSelector": {"disktype": "ssd"},
    "env": [{"name": "TASK_FLAVOUR", "value": "heavy"}]})
def resources():
    return os.environ.get("TASK_FLAVOUR")


@app.task(name="taskapp.local_add")
def local_add(x, y):
    return x + y


@control_command(args=[("seconds", float)], signature="<seconds>")
def block_event_loop(state, seconds: float = 30.0):
    """Hold the worker's event loop, as a consumer stuck on a call that never returns."""
    time.sleep(seconds)
    return {"ok": f"blocked {seconds}s"}


@app.task(name="taskapp.api_access")
def api_access() -> dict:
    """What this pod's own service-account token may do: the API's answer per request."""
    from k8s_celery.cluster import ApiError, KubeApi, collection_path, load_configuration
    from k8s_celery.config import SERVICE_ACCOUNT_NAMESPACE

    api = KubeApi(load_configuration(in_cluster=True))
    namespace = open(SERVICE_ACCOUNT_NAMESPACE).read().strip()
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "escalate"},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "x", "image": "x"}]}}}}
    attempts = {"list pods": lambda: api.list(collection_path("pods", namespace)),
                "create jobs": lambda: api.create(collection_path("jobs", namespace), job)}
    answers = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            answers[what] = 200
        except ApiError as exc:
            answers[what] = exc.status
    return answers
