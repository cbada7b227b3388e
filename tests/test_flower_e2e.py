"""Flower, the real program, sees the shim like any worker and drives it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import urllib3

from conftest import APPS, live_jobs
from k8s_celery.testing import wait_until
from k8s_celery.testing.server import free_port

pytestmark = pytest.mark.cluster
ARTIFACTS = Path(__file__).parent.parent / "artifacts"


@pytest.fixture
def flower(broker_url, tmp_path, taskapp):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": broker_url,
           "CELERY_RESULT_BACKEND": broker_url, "FLOWER_UNAUTHENTICATED_API": "true"}
    process = subprocess.Popen([sys.executable, "-m", "celery", "-A", "taskapp", "flower", f"--port={port}",
                                "--address=127.0.0.1"], env=env, stdout=open(tmp_path / "flower.log", "wb"),
                               stderr=subprocess.STDOUT)
    http = urllib3.PoolManager()
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return http.request("GET", f"{base}/healthcheck", timeout=2).status == 200
        except urllib3.exceptions.HTTPError:
            return False
    wait_until(up, timeout=60, message="flower")
    yield base, http
    process.terminate()
    process.wait(20)


def get_json(http, url):
    response = http.request("GET", url, timeout=30)
    assert response.status == 200, response.data
    return json.loads(response.data)


def test_flower_shows_and_controls_the_shim(start_shim, taskapp, flower, k8s_cluster, k8s_namespace):
    base, http = flower
    shim = start_shim(max_jobs=4)
    workers = wait_until(lambda: get_json(http, f"{base}/api/workers?refresh=1").get(shim.hostname),
                         timeout=60, message="the shim in flower")
    pool = workers["stats"]["pool"]
    assert pool["implementation"] == "k8s_celery.pool:KubernetesPool" and pool["max-concurrency"] == 4

    ok = taskapp.add.delay(2, 2)
    bad = taskapp.fail.delay("for flower")
    retried = taskapp.retry_once.delay("flower")
    assert ok.get(timeout=60) == 4 and retried.get(timeout=90) == "retried"
    with pytest.raises(ValueError):
        bad.get(timeout=60)

    def info(task_id):  # {} until flower has seen the task's first event
        response = http.request("GET", f"{base}/api/task/info/{task_id}", timeout=30)
        return json.loads(response.data) if response.status == 200 else {}
    done = wait_until(lambda: (lambda t: t if t.get("state") == "SUCCESS" else None)(info(ok.id)),
                      message="success in flower")
    assert done["result"] == "4" and done["runtime"] is not None and done["worker"] == shim.hostname
    assert done["received"] and done["started"]
    failed = wait_until(lambda: (lambda t: t if t.get("state") == "FAILURE" else None)(info(bad.id)),
                        message="failure in flower")
    assert "ValueError" in failed["exception"] and "raise ValueError" in failed["traceback"]
    wait_until(lambda: retried.id in get_json(http, f"{base}/api/tasks"), message="the retried task in flower")

    running = taskapp.sleep.delay(60)
    wait_until(lambda: info(running.id).get("state") == "STARTED", timeout=60, message="started in flower")
    answer = http.request("POST", f"{base}/api/task/revoke/{running.id}?terminate=true", timeout=30)
    assert answer.status == 200, answer.data
    wait_until(lambda: not live_jobs(k8s_cluster, k8s_namespace), timeout=30, message="the Job deleted")
    wait_until(lambda: info(running.id).get("state") == "REVOKED", timeout=30, message="revoked in flower")

    for action, expected in (("grow", 5), ("shrink", 4)):
        answer = http.request("POST", f"{base}/api/worker/pool/{action}/{shim.hostname}?n=1", timeout=30)
        assert answer.status == 200, answer.data
        wait_until(lambda: get_json(http, f"{base}/api/workers?refresh=1")[shim.hostname]["stats"]["pool"]
                   ["max-concurrency"] == expected, message=f"pool {action}")

    chromium = shutil.which("chromium")
    if chromium:  # the screenshot only; everything above runs without Chromium
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "flower-task.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={ARTIFACTS / 'chromium-profile'}",
                        "--window-size=1400,1000", f"--screenshot={shot}", f"{base}/task/{bad.id}"],
                       check=True, timeout=120, capture_output=True)
        assert shot.stat().st_size > 10_000
