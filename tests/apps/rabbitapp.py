"""The Celery app of the RabbitMQ end-to-end tests: RabbitMQ as broker, Redis as result backend.

Loaded by the shim (``-A rabbitapp``), by the pods and by the tests. Queue options come
from the environment so that one module serves every broker set-up under test:

* ``RABBITAPP_QUEUE_TYPE=quorum`` declares the queues as quorum queues
  (``x-queue-type: quorum``), the way Celery's documentation configures it;
* ``RABBITAPP_CONSUMER_TIMEOUT`` (ms) adds an ``x-consumer-timeout`` queue argument.

Celery 5.5+ uses its native delayed delivery (``countdown``/``eta`` through RabbitMQ's
``celery_delayed_*`` exchanges instead of the worker's timer) as soon as a queue is a
quorum queue; it needs topic (or fanout) exchanges, hence the ones below.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from kombu import Exchange, Queue

BROKER = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
QUEUE_TYPE = os.environ.get("RABBITAPP_QUEUE_TYPE", "classic")
CONSUMER_TIMEOUT = os.environ.get("RABBITAPP_CONSUMER_TIMEOUT")


def _queue_arguments() -> dict:
    arguments = {}
    if QUEUE_TYPE != "classic":
        arguments["x-queue-type"] = QUEUE_TYPE
    if CONSUMER_TIMEOUT:
        arguments["x-consumer-timeout"] = int(CONSUMER_TIMEOUT)
    return arguments


# Topic exchanges: Celery's native delayed delivery refuses direct ones.
QUEUES = [Queue(name, Exchange(name, type="topic"), routing_key=name, queue_arguments=_queue_arguments())
          for name in ("kubernetes", "kubernetes-big")]

app = Celery("rabbitapp", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_queues=QUEUES,
    task_default_queue="kubernetes",
    task_default_exchange="kubernetes",
    task_default_exchange_type="topic",
    task_default_routing_key="kubernetes",
    result_extended=True,
    task_track_started=True,
    broker_connection_retry_on_startup=True,
)
if QUEUE_TYPE == "quorum":
    app.conf.task_default_queue_type = "quorum"


def store() -> redis.Redis:
    """Where tasks count their runs: the result backend's Redis."""
    return redis.Redis.from_url(BACKEND)


# shared=False: the tests import this module afresh for each vhost; shared tasks of an
# earlier import would be added to every app finalized later (DuplicateTaskNameWarning).
@app.task(name="rabbitapp.add", shared=False)
def add(x, y):
    return x + y


@app.task(name="rabbitapp.tsum", shared=False)
def tsum(numbers):
    return sum(numbers)


@app.task(name="rabbitapp.fail", shared=False)
def fail(message):
    raise ValueError(message)


@app.task(name="rabbitapp.count", shared=False)
def count(key, sleep=0.0):
    """Record a start, sleep, then count a completed run of this key."""
    store().incr(f"starts:{key}")
    time.sleep(sleep)
    return store().incr(f"runs:{key}")


@app.task(name="rabbitapp.retry_once", shared=False, bind=True)
def retry_once(self, key):
    if store().incr(f"attempts:{key}") == 1:
        raise self.retry(countdown=1)
    return "retried"


@app.task(name="rabbitapp.sleep", shared=False)
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="rabbitapp.stamp", shared=False)
def stamp():
    """The wall-clock time at which the task body ran."""
    return time.time()
