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
    # A pod given TASKAPP_ACCEPT=json plays an image whose app no longer accepts pickle.
    accept_content=os.environ.get("TASKAPP_ACCEPT", "json,pickle").split(","),
    result_accept_content=["json", "pickle"],
    broker_transport_options={"visibility_timeout": float(os.environ.get("TASKAPP_VISIBILITY_TIMEOUT", 3600)),
                              # sweep for abandoned messages every second (default: ~100 s)
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
                              # a worker SIGKILLed while restoring holds the lock this long
                              "unacked_mutex_expire": 10},
)


if os.environ.get("TASKAPP_TOPIC"):
    # Two queues bound to one topic exchange by patterns, as some deployments route.
    from kombu import Exchange, Queue

    _topic = Exchange("tasks", type="topic")
    app.conf.task_queues = [Queue("k8s-reports", _topic, routing_key="reports.#"),
                            Queue("k8s-images", _topic, routing_key="images.*")]

if os.environ.get("TASKAPP_BEAT"):
    app.conf.beat_schedule = {"count-every-2s": {"task": "taskapp.count", "schedule": 2.0,
                                                 "args": ("beat",)}}


if os.environ.get("TASKAPP_SIGNAL_LOG"):
    # Which worker signals reach this process, in order (the runner's tests read it).
    from celery import signals

    def _record(name):
        def handler(sender=None, **kwargs):
            detail = getattr(sender, "pool_cls", "") if name == "worker_init" else kwargs.get("exitcode", "")
            with open(os.environ["TASKAPP_SIGNAL_LOG"], "a") as log:
                log.write(f"{name} {detail}".strip() + "\n")
        return handler

    for _name in ("worker_init", "worker_process_init", "worker_process_shutdown"):
        getattr(signals, _name).connect(_record(_name), weak=False)


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


@app.task(name="taskapp.chatty")
def chatty(tag, fail=False, megabytes=0, binary=False, sleep=0.0):
    """Print and log ``tag`` (and ``megabytes`` of filler lines, raw bytes), then return or raise."""
    import logging
    import sys

    print(f"printed {tag}", flush=True)
    logging.getLogger("taskapp").warning("logged %s", tag)
    for _ in range(megabytes):
        sys.stdout.write(("y" * 1023 + "\n") * 1024)
    if binary:  # straight to the container's stdout, as a C library writes
        os.write(1, b"raw \xff\xfe \x1b[31mred\x1b[0m end\n")
    print(f"last line of {tag}", flush=True)
    time.sleep(sleep)
    if fail:
        raise ValueError(f"chatty {tag} failed")
    return tag


@app.task(name="taskapp.lost_once")
def lost_once(key, megabytes=0, sleep=0.0):
    """Attempt 1 prints, then fills ``megabytes`` of memory and sleeps ``sleep`` s (to be
    OOM-killed or evicted); later attempts print and return their number."""
    attempt = store().incr(f"attempts:{key}")
    print(f"attempt {attempt} of {key} starts", flush=True)
    if attempt == 1:
        block = b"\x01" * (megabytes * 2**20)
        time.sleep(sleep)
        del block
    print(f"attempt {attempt} of {key} ends", flush=True)
    return attempt


@app.task(name="taskapp.allocate")
def allocate(megabytes):
    """Fill ``megabytes`` of memory (every page written), hold it a moment, return the size."""
    block = b"\x01" * (megabytes * 2**20)
    time.sleep(1)
    return len(block) // 2**20


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


@app.task(name="taskapp.stubborn")
def stubborn(seconds):
    """Sleeps through its soft time limit: only the hard limit stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            pass
    return "done"


@app.task(name="taskapp.catch_soft")
def catch_soft(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "caught soft limit"
    return "not interrupted"


@app.task(name="taskapp.reject")
def reject():
    raise Reject("no thanks", requeue=False)


@app.task(name="taskapp.reject_once")
def reject_once(key):
    """Reject with requeue on the first run; return the run's number on the next."""
    runs = store().incr(f"rejections:{key}")
    if runs == 1:
        raise Reject("not yet", requeue=True)
    return runs


@app.task(name="taskapp.slow_once", time_limit=4, acks_on_failure_or_timeout=False, acks_on_timeout=False)
def slow_once(key):
    """Run past the time limit the first time (Celery then requeues the message: the task
    does not ack on a timeout); return the run's number the next time."""
    runs = store().incr(f"slow:{key}")
    if runs == 1:
        time.sleep(60)
    return runs


@app.task(name="taskapp.echo")
def echo(value):
    return value


@app.task(name="taskapp.child_environment")
def child_environment(name):
    """The value of the environment variable ``name`` in a subprocess of the task (or ``None``)."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ.get({name!r}, '-'))"],
                           capture_output=True, text=True, check=True)
    value = child.stdout.strip()
    return None if value == "-" else value


@app.task(name="taskapp.resources", kubernetes={
    "resources": {"limits": {"memory": "64Mi", "cpu": "250m"}},
    "nodeSelector": {"disktype": "ssd"},
    "env": [{"name": "TASK_FLAVOUR", "value": "heavy"}]})
def resources():
    return os.environ.get("TASK_FLAVOUR")


@app.task(name="taskapp.urgent", kubernetes={"workloadPriorityClass": "high"})
def urgent(key):
    """Counted as ``count`` is; its Job asks Kueue for the WorkloadPriorityClass ``high``."""
    return store().incr(f"runs:{key}")


@app.task(name="taskapp.misqueued", kubernetes={"queue_name": "no-such-queue"})
def misqueued():
    """Its Job names a LocalQueue that does not exist."""
    return "never runs"


@app.task(name="taskapp.local_add")
def local_add(x, y):
    return x + y


@app.task(name="taskapp.local_hard_limited", time_limit=2)
def local_hard_limited():
    """hard_limited for a prefork worker (routed to the `default` queue)."""
    time.sleep(60)


@app.task(name="taskapp.retry_now", bind=True)
def retry_now(self, key):
    """Retries at once (countdown 0): the new message, same task id, arrives while the
    first pod is still ending."""
    if store().incr(f"attempts:{key}") == 1:
        raise self.retry(countdown=0)
    return f"ran {self.request.retries + 1} times"


@app.task(name="taskapp.replace_with_add", bind=True)
def replace_with_add(self, x, y):
    """Replaces itself with add(x, y): the replacement runs under this task's id."""
    raise self.replace(add.s(x, y))


if os.environ.get("TASKAPP_REGISTER_HIDDEN", "1") == "1":
    @app.task(name="taskapp.hidden")
    def hidden():
        """Registered in the worker, absent from pods started with TASKAPP_REGISTER_HIDDEN=0
        (a pod image older than the worker's)."""
        return "visible"


@control_command(args=[("seconds", float)], signature="<seconds>")
def block_event_loop(state, seconds: float = 30.0):
    """Hold the worker's event loop, as a consumer stuck on a call that never returns."""
    time.sleep(seconds)
    return {"ok": f"blocked {seconds}s"}


@app.task(name="taskapp.api_access")
def api_access(other_secret: str | None = None) -> dict:
    """What this pod's own service-account token may do: the API's answer per request.
    ``other_secret``: another task's payload Secret, to read and to mount in a pod."""
    from k8s_celery.cluster import ApiError, KubeApi, collection_path, load_configuration, object_path
    from k8s_celery.config import SERVICE_ACCOUNT_NAMESPACE

    api = KubeApi(load_configuration(in_cluster=True))
    namespace = open(SERVICE_ACCOUNT_NAMESPACE).read().strip()
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "escalate"},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "x", "image": "x"}]}}}}
    attempts = {"list pods": lambda: api.list(collection_path("pods", namespace)),
                "create jobs": lambda: api.create(collection_path("jobs", namespace), job)}
    if other_secret:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "steal"},
               "spec": {"containers": [{"name": "x", "image": "x", "volumeMounts": [
                            {"name": "loot", "mountPath": "/loot"}]}],
                        "volumes": [{"name": "loot", "secret": {"secretName": other_secret}}]}}
        attempts.update({"get the other task's secret": lambda: api.get(object_path("secrets", namespace,
                                                                                     other_secret)),
                         "list secrets": lambda: api.list(collection_path("secrets", namespace)),
                         "create a pod mounting it": lambda: api.create(collection_path("pods", namespace), pod)})
    answers = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            answers[what] = 200
        except ApiError as exc:
            answers[what] = exc.status
    return answers
