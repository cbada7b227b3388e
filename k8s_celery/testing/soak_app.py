"""The Celery app of the chaos soak: every task counts its completed runs in Redis."""

from __future__ import annotations

import os
import socket
import time

import redis
from celery import Celery
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
#: Seconds kombu's restore lock outlives a worker killed while holding it.
UNACKED_MUTEX_EXPIRE = 10

app = Celery("soak", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue="kubernetes",
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": float(os.environ.get("SOAK_VISIBILITY_TIMEOUT", 10)),
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
                              # A worker SIGKILLed while restoring abandoned messages keeps
                              # kombu's restore lock until it expires (300 s by default):
                              # nothing is redelivered meanwhile.
                              "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE},
    # Redis restarts during the soak: results are stored once it is back.
    result_backend_always_retry=True,
    result_backend_max_retries=60,
    redis_backend_health_check_interval=5,
)


@retry(retry=retry_if_exception_type(redis.ConnectionError), stop=stop_after_delay(60), wait=wait_fixed(0.5),
       reraise=True)
def _count_run(task_id: str, run: str) -> int:
    # A set of pod names, not INCR: retrying the call after a Redis restart must
    # not count one run twice; a second pod running the task does count.
    client = redis.Redis.from_url(BROKER)
    client.sadd(f"soak:runs:{task_id}", run)
    return client.scard(f"soak:runs:{task_id}")


@retry(retry=retry_if_exception_type(redis.ConnectionError), stop=stop_after_delay(60), wait=wait_fixed(0.5),
       reraise=True)
def _first_attempt(task_id: str) -> bool:
    return bool(redis.Redis.from_url(BROKER).set(f"soak:oom:{task_id}", 1, nx=True))


@app.task(name="soak.work", bind=True)
def work(self, seconds: float, oom_mb: int = 0) -> int:
    """Sleep, then count one completed run of this task id. With ``oom_mb``, its first
    attempt first fills that much memory (every page written): past its pod's memory
    limit, the kernel kills it, and the attempt after it runs as any other."""
    if oom_mb and _first_attempt(self.request.id):
        b"\x01" * (oom_mb * 2**20)  # every page written: under a smaller limit, the kernel kills it here
    time.sleep(seconds)
    return _count_run(self.request.id, socket.gethostname())
