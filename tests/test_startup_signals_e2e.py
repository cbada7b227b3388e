"""A task pod starts up as a prefork pool process finds itself: the worker's start-up
signals, in prefork's order, with the worker's hostname and log level; what an app sets up
on them (Nautobot's task-log handler on ``celeryd_after_setup``, its log level on
``after_setup_logger``) is there when the task runs. Shown side by side with a real prefork
worker running the same app: real Redis, the local cluster, the real worker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import APPS, stop_process
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster

PREFORK_STARTUP = ["import_modules", "celeryd_init", "worker_init", "after_setup_logger",
                   "after_setup_task_logger", "celeryd_after_setup", "worker_process_init"]


def test_a_pod_starts_up_as_a_prefork_child_and_the_app_handlers_get_the_task_records(start_shim, broker_url,
                                                                                      tmp_path):
    import signalapp

    shim = start_shim(app_name="signalapp")
    in_pod = signalapp.job.apply_async(queue="kubernetes")
    pod_answer = in_pod.get(timeout=60)

    prefork = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "signalapp", "worker", "-P", "prefork", "-c", "1",
         "-Q", "signals-prefork", "-n", "prefork-signals@local", "-l", "INFO", "--without-mingle",
         "--without-gossip"],
        env={**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": broker_url,
             "CELERY_RESULT_BACKEND": broker_url, "C_FORCE_ROOT": "1"},
        stdout=open(tmp_path / "prefork.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: signalapp.app.control.ping(destination=["prefork-signals@local"], timeout=0.5),
                   timeout=60, message="the prefork worker")
        in_child = signalapp.job.apply_async(queue="signals-prefork")
        child_answer = in_child.get(timeout=60)
    finally:
        stop_process(prefork)

    for answer in (pod_answer, child_answer):
        assert [name for name, _ in answer["seen"]] == PREFORK_STARTUP, answer["seen"]
        assert answer["level"] == logging.INFO  # the worker's -l INFO
        assert "RedisTaskHandler" in answer["task_handlers"]
    # celeryd_init and celeryd_after_setup name the worker that received the task.
    assert dict(pod_answer["seen"])["celeryd_init"] == dict(pod_answer["seen"])["celeryd_after_setup"] \
        == shim.hostname
    assert dict(child_answer["seen"])["celeryd_init"] == "prefork-signals@local"
    # Nautobot's JobLogEntry rows, here a Redis list: the task's records, its own level included.
    for result in (in_pod, in_child):
        records = [json.loads(r) for r in signalapp.store().lrange(f"signalapp:records:{result.id}", 0, -1)]
        assert records == [["INFO", "step one"], ["SUCCESS", "job done"]], records
