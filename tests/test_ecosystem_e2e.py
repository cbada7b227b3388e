"""Drop-in for the Celery ecosystem, shown with the real tools: Beat, inspect/control,
the calling API and canvas, a mixed deployment, serializers."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest

from conftest import APPS, live_jobs, stop_process
from k8s_celery.testing import wait_until

pytestmark = pytest.mark.cluster


def celery_process(args: list[str], broker_url: str, log_path, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": broker_url,
                   "CELERY_RESULT_BACKEND": broker_url, "C_FORCE_ROOT": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "taskapp", *args], env=environment,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def test_beat_launches_jobs_on_schedule(start_shim, taskapp, broker_url, tmp_path):
    start_shim()
    beat = celery_process(["beat", "-s", str(tmp_path / "schedule"), "-l", "INFO"], broker_url,
                          tmp_path / "beat.log", TASKAPP_BEAT="1")
    try:
        wait_until(lambda: int(taskapp.store().get("runs:beat") or 0) >= 2, timeout=90,
                   message="two scheduled runs")
    finally:
        stop_process(beat)
    assert "Scheduler: Sending due task count-every-2s" in (tmp_path / "beat.log").read_text()


def test_inspect_and_control(start_shim, taskapp, k8s_cluster, k8s_namespace):
    shim = start_shim(max_jobs=3)
    control = taskapp.app.control
    inspect = control.inspect(destination=[shim.hostname], timeout=5)
    assert inspect.ping()[shim.hostname] == {"ok": "pong"}
    assert "taskapp.add" in inspect.registered()[shim.hostname]
    assert [q["name"] for q in inspect.active_queues()[shim.hostname]] == ["kubernetes"]
    assert "broker_url" in inspect.conf()[shim.hostname]
    later = taskapp.add.apply_async((1, 1), countdown=30)
    wait_until(lambda: (inspect.scheduled() or {}).get(shim.hostname), message="a scheduled task")
    assert inspect.scheduled()[shim.hostname][0]["request"]["id"] == later.id
    later.revoke()
    wait_until(lambda: later.id in (inspect.revoked() or {}).get(shim.hostname, []), message="revoked list")

    control.pool_grow(2, destination=[shim.hostname], reply=True)
    assert inspect.stats()[shim.hostname]["pool"]["max-concurrency"] == 5
    control.pool_shrink(1, destination=[shim.hostname], reply=True)
    assert inspect.stats()[shim.hostname]["pool"]["max-concurrency"] == 4

    assert control.rate_limit("taskapp.add", "100/m", destination=[shim.hostname], reply=True)[0][shim.hostname]["ok"]
    assert control.time_limit("taskapp.sleep", soft=20, hard=30, destination=[shim.hostname],
                              reply=True)[0][shim.hostname]["ok"]
    control.add_consumer("extra", destination=[shim.hostname], reply=True)
    wait_until(lambda: "extra" in [q["name"] for q in inspect.active_queues()[shim.hostname]],
               message="the new consumer")
    control.cancel_consumer("extra", destination=[shim.hostname], reply=True)
    wait_until(lambda: "extra" not in [q["name"] for q in inspect.active_queues()[shim.hostname]],
               message="the consumer to go")

    running = taskapp.sleep.delay(5)
    wait_until(lambda: (inspect.reserved() or {}).get(shim.hostname) or (inspect.active() or {}).get(shim.hostname),
               message="the task reserved or active")
    assert running.get(timeout=60) == 5
    control.shutdown(destination=[shim.hostname])
    shim.process.wait(30)
    assert shim.process.returncode is not None


def test_calling_api(start_shim, taskapp, k8s_cluster, k8s_namespace):
    start_shim(max_jobs=6)
    started = time.monotonic()
    assert taskapp.add.apply_async((1, 2), countdown=2).get(timeout=60) == 3
    assert time.monotonic() - started >= 2
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    assert taskapp.add.apply_async((2, 2), eta=eta).get(timeout=60) == 4
    expired = taskapp.add.apply_async((3, 3), expires=datetime.datetime.now(datetime.timezone.utc)
                                      - datetime.timedelta(seconds=1))
    wait_until(lambda: expired.state == "REVOKED", timeout=30, message="the expired task revoked")
    odd_id = "Weird ID/with:colons_and_UNDERSCORES and spaces ü"
    assert taskapp.echo.apply_async(("odd",), task_id=odd_id).get(timeout=60) == "odd"
    assert taskapp.echo.apply_async(("prio",), priority=5, headers={"tenant": "a"}).get(timeout=60) == "prio"
    linked = taskapp.add.apply_async((1, 1), link=taskapp.add.s(10))
    assert linked.get(timeout=60) == 2
    wait_until(lambda: linked.children and linked.children[0].ready(), timeout=60, message="the link")
    assert linked.children[0].get(timeout=10) == 12
    failing = taskapp.fail.apply_async(("x",), link_error=taskapp.count.si("errback"))
    with pytest.raises(ValueError):
        failing.get(timeout=60)
    wait_until(lambda: taskapp.store().get("runs:errback") == b"1", timeout=60, message="the errback")
    from celery import group

    assert group(taskapp.add.s(i, i) for i in range(4)).delay().get(timeout=120) == [0, 2, 4, 6]
    assert taskapp.add.starmap([(1, 1), (2, 2)]).delay().get(timeout=60) == [2, 4]
    tracked = taskapp.sleep.delay(3)
    wait_until(lambda: tracked.state == "STARTED", timeout=60, message="STARTED (task_track_started)")
    assert tracked.get(timeout=60) == 3
    extended = taskapp.app.AsyncResult(tracked.id)
    assert extended.name == "taskapp.sleep" and extended.args == [3]
    assert extended.worker.startswith("kc-"), "result_extended: the pod's name is the worker"
    ignored = taskapp.echo.apply_async(("quiet",), ignore_result=True)
    # the failed task's Job above is kept for a post-mortem
    wait_until(lambda: not live_jobs(k8s_cluster, k8s_namespace), timeout=60, message="the quiet Job done")
    assert ignored.state == "PENDING"


def test_mixed_deployment_routes_by_queue(start_shim, taskapp, broker_url, tmp_path, k8s_cluster, k8s_namespace):
    start_shim()
    prefork = celery_process(["worker", "-Q", "default", "-c", "1", "-n", "prefork@local", "-l", "INFO"],
                             broker_url, tmp_path / "prefork.log")
    try:
        assert taskapp.local_add.delay(2, 2).get(timeout=60) == 4
        assert taskapp.add.delay(3, 3).get(timeout=60) == 6
    finally:
        stop_process(prefork)
    assert "taskapp.local_add" in (tmp_path / "prefork.log").read_text()
    assert "taskapp.add" not in (tmp_path / "prefork.log").read_text().split("[tasks]")[-1].split("received")[0] \
        or "taskapp.add[" not in (tmp_path / "prefork.log").read_text()


def test_pickle_serializer_and_compression(start_shim, taskapp):
    start_shim()
    result = taskapp.echo.apply_async((["pickled", 1],), serializer="pickle", compression="zlib")
    assert result.get(timeout=60) == ["pickled", 1]
    assert taskapp.add.apply_async((5, 5), compression="gzip").get(timeout=60) == 10
