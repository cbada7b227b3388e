"""An example Celery app: `default` runs on an ordinary worker, `kubernetes` as Jobs."""

from __future__ import annotations

import os
import socket
import time

from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")

app = Celery("demo_app", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(
    task_routes={"demo_app.report": {"queue": "kubernetes"},
                 "demo_app.crunch": {"queue": "kubernetes"}},
    result_extended=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="demo_app.crunch", kubernetes={"resources": {"limits": {"memory": "256Mi", "cpu": "500m"}}})
def crunch(n: int) -> dict:
    """A heavy task that deserves its own pod and resources."""
    started = time.monotonic()
    total = sum(i * i for i in range(n))
    return {"n": n, "sum_of_squares": total, "pod": socket.gethostname(),
            "seconds": round(time.monotonic() - started, 3)}


@app.task(name="demo_app.report", bind=True, max_retries=3)
def report(self, name: str) -> str:
    print(f"building report {name} (attempt {self.request.retries + 1})")  # relayed into the worker's log
    if name == "flaky" and self.request.retries == 0:
        raise self.retry(countdown=1)
    if name == "broken":
        raise ValueError(f"cannot build report {name!r}")
    return f"report {name} built in pod {socket.gethostname()} (retries: {self.request.retries})"
