"""The Celery app the benchmark runs: one no-op task, in the shim, the pods and a prefork worker."""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("benchapp", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(task_default_queue="kubernetes", broker_connection_retry_on_startup=True)


@app.task(name="bench.noop")
def noop():
    """Does nothing: what is measured is the machinery around it."""
