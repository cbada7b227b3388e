"""A real ``celery flower`` process for any test app, and the parts of its HTTP API the tests read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import urllib3

from k8s_celery.testing import wait_until
from k8s_celery.testing.server import free_port


class Flower:
    """``celery -A <app> flower`` on a free loopback port, with the unauthenticated API on."""

    def __init__(self, app_name: str, env: dict[str, str], log_path: Path, cwd: Path | None = None,
                 args: tuple = ()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "celery", "-A", app_name, "flower", f"--port={self.port}",
                     "--address=127.0.0.1", *args]
        self.env = {**os.environ, **env, "FLOWER_UNAUTHENTICATED_API": "true"}
        self.log_path = log_path
        self.cwd = cwd
        self.http = urllib3.PoolManager()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Flower:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> Flower:
        """Start Flower and wait until its health check answers."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(self._up, timeout=60, message=lambda: f"flower to answer:\n{self.log()[-3000:]}")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        try:
            return self.http.request("GET", f"{self.base}/healthcheck", timeout=2).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    def stop(self) -> None:
        """Stop Flower."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        """Flower's output."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        """GET an API path; the decoded JSON (``None`` unless 200)."""
        response = self.http.request("GET", f"{self.base}{path}", timeout=30)
        return json.loads(response.data) if response.status == 200 else None

    def post(self, path: str) -> urllib3.BaseHTTPResponse:
        """POST to an API path."""
        return self.http.request("POST", f"{self.base}{path}", timeout=30)

    def task(self, task_id: str) -> dict:
        """Flower's view of a task (``{}`` until Flower has seen one of its events)."""
        return self.get(f"/api/task/info/{task_id}") or {}

    def wait_for_state(self, task_id: str, state: str, timeout: float = 60) -> dict:
        """Flower's view of the task once it shows ``state``."""
        return wait_until(lambda: (lambda t: t if t.get("state") == state else None)(self.task(task_id)),
                          timeout=timeout,
                          message=lambda: f"{task_id} {state} in flower; it shows {self.task(task_id)}")

    def workers(self) -> dict:
        """The workers Flower knows, refreshed (``inspect`` of every worker)."""
        return self.get("/api/workers?refresh=1") or {}

    def page(self, path: str) -> str:
        """The HTML of a Flower page."""
        response = self.http.request("GET", f"{self.base}{path}", timeout=30)
        assert response.status == 200, response.data[:500]
        return response.data.decode()
