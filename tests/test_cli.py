"""``k8s-celery render`` and the worker's start-up checks, without a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from conftest import APPS, write_manifest

ENV = {**os.environ, "PYTHONPATH": str(APPS), "CELERY_BROKER_URL": "memory://", "C_FORCE_ROOT": "1"}


def k8s_celery(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k8s_celery", *args], capture_output=True, text=True,
                          env=ENV, timeout=60)


def test_render_prints_job_and_redacted_secret(tmp_path):
    write_manifest(tmp_path, "kubernetes", "redis://broker:6379/0")
    done = k8s_celery("render", "-A", "taskapp", "--queue", "kubernetes", "--task", "taskapp.resources",
                      "--manifests", str(tmp_path), "--namespace", "jobs", "--task-id", "Weird ID/1")
    assert done.returncode == 0, done.stderr
    job, secret = yaml.safe_load_all(done.stdout)
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "jobs"
    assert job["metadata"]["annotations"]["k8s-celery.io/task-id"] == "Weird ID/1"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"memory": "64Mi", "cpu": "250m"}}
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"disktype": "ssd"}
    assert secret["kind"] == "Secret" and secret["data"]["payload.json"].startswith("<redacted")


def test_render_of_an_inline_queue_prints_the_job_alone_its_payload_redacted(tmp_path):
    write_manifest(tmp_path, "kubernetes", "redis://broker:6379/0",
                   job_annotations={"k8s-celery.io/payload": "inline"})
    done = k8s_celery("render", "-A", "taskapp", "--queue", "kubernetes", "--task", "taskapp.echo",
                      "--args", '["not secret"]', "--manifests", str(tmp_path), "--namespace", "jobs")
    assert done.returncode == 0, done.stderr
    [job] = yaml.safe_load_all(done.stdout)
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["k8s-celery.io/payload-json"].startswith("<redacted: ")
    assert "not secret" not in done.stdout


def test_render_unknown_task_is_a_clear_error(tmp_path):
    write_manifest(tmp_path, "kubernetes", "redis://broker:6379/0")
    done = k8s_celery("render", "-A", "taskapp", "--queue", "kubernetes", "--task", "nope",
                      "--manifests", str(tmp_path))
    assert done.returncode == 2 and "not registered" in done.stderr


def test_worker_refuses_a_queue_without_manifest(tmp_path):
    done = k8s_celery("worker", "-A", "taskapp", "-Q", "kubernetes,other", "--manifests", str(tmp_path))
    assert done.returncode == 2
    assert "no manifest for queue 'kubernetes'" in done.stderr


def test_worker_refuses_an_invalid_manifest(tmp_path):
    (tmp_path / "kubernetes").mkdir()
    (tmp_path / "kubernetes" / "manifest.yaml").write_text(
        "apiVersion: batch/v1\nkind: Job\nspec:\n  template:\n    spec:\n"
        "      containers: [{name: t, image: i, restartPolicy: sometimes, bogus: 1}]\n")
    done = k8s_celery("worker", "-A", "taskapp", "-Q", "kubernetes", "--manifests", str(tmp_path))
    assert done.returncode == 2
    assert "manifest.yaml, field spec.template.spec.containers.0" in done.stderr
