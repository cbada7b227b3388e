"""An app that sets its workers up through Celery's start-up signals, as Nautobot does.

On ``after_setup_logger`` it adds a log level (Nautobot's ``success``); on
``celeryd_after_setup`` it adds a handler to the ``celery.task`` logger that stores every
task log record in Redis (Nautobot's database handler writes them to the job's
JobLogEntry rows). Each signal this process has seen, or inherited from the parent a
prefork child was forked from, is kept in :data:`SEEN`; ``signalapp.job`` returns them.
"""

from __future__ import annotations

import json
import logging
import os

import redis
from celery import Celery, signals
from celery.utils.log import get_task_logger

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
SUCCESS = 25

app = Celery("signalapp", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(task_default_queue="kubernetes", broker_connection_retry_on_startup=True)
logger = get_task_logger(__name__)

#: ``(signal, sender as text)`` in the order this process saw them.
SEEN: list[tuple[str, str]] = []


def store() -> redis.Redis:
    return redis.Redis.from_url(BROKER)


class RedisTaskHandler(logging.Handler):
    """Stores each task log record under its task id, as Nautobot's database handler does."""

    def emit(self, record: logging.LogRecord) -> None:
        from celery import current_task

        task_id = current_task.request.id if current_task else None
        if task_id:
            store().rpush(f"signalapp:records:{task_id}",
                          json.dumps([record.levelname, record.getMessage()]))


def _seen(name: str):
    def handler(sender=None, **kwargs):
        SEEN.append((name, sender if isinstance(sender, str) else type(sender).__name__))
        if name == "after_setup_logger":
            logging.addLevelName(SUCCESS, "SUCCESS")
        if name == "celeryd_after_setup":
            logging.getLogger("celery.task").addHandler(RedisTaskHandler())
    return handler


# (Not setup_logging: a receiver there replaces Celery's own logging set-up, and with it the
# after_setup_* signals.)
for _name in ("import_modules", "celeryd_init", "worker_init", "after_setup_logger",
              "after_setup_task_logger", "celeryd_after_setup", "worker_process_init"):
    getattr(signals, _name).connect(_seen(_name), weak=False)


@app.task(name="signalapp.job")
def job():
    """Log through the task logger (one record at Nautobot's SUCCESS level); return what
    this process saw of the start-up signals."""
    logger.info("step one")
    logger.log(SUCCESS, "job done")
    return {"seen": SEEN, "task_handlers": [type(h).__name__ for h in logging.getLogger("celery.task").handlers],
            "level": logging.getLogger().getEffectiveLevel()}
