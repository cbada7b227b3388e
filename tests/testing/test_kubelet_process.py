"""Container runs of the process kubelet: the helper's spec and real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from k8s_celery.testing.kubelet.process import ContainerRun, container_spec, create_run_dir

POD = {"metadata": {"name": "web-1", "namespace": "ns"}, "spec": {}}


def test_create_run_dir_leaves_an_empty_world_writable_termination_log(tmp_path):
    message_path = create_run_dir(tmp_path / "main-0")
    assert message_path == tmp_path / "main-0" / "termination-log"
    assert message_path.read_bytes() == b""
    assert message_path.stat().st_mode & 0o777 == 0o666


def test_container_spec(tmp_path):
    container = {"name": "main", "command": ["sh", "-c", "echo $(GREETING) $$(HOME)"], "args": ["$(NAME)"],
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": True},
                                  {"name": "config", "mountPath": "/etc/one", "subPath": "one.conf"},
                                  {"name": "absent", "mountPath": "/nowhere"}],
                 "terminationMessagePath": "/tmp/message"}
    env = {"GREETING": "hello", "NAME": "world"}
    spec = container_spec(POD, container, env, {"config": Path("/volumes/config")}, tmp_path)
    assert spec["command"] == ["sh", "-c", "echo hello $(HOME)", "world"]
    assert spec["env"] is env
    assert spec["workingDir"] == str(tmp_path)  # root: the run's directory
    assert spec["hostname"] == "web-1"
    assert spec["security"]["uid"] == 0
    assert spec["mounts"] == [
        {"source": "/volumes/config", "target": "/etc/app", "readOnly": True},
        {"source": "/volumes/config/one.conf", "target": "/etc/one", "readOnly": False},
        {"source": str(tmp_path / "termination-log"), "target": "/tmp/message"}]


def test_container_spec_defaults(tmp_path):
    pod = {"metadata": {"name": "web-1"},
           "spec": {"hostname": "web", "securityContext": {"runAsUser": 1000}}}
    spec = container_spec(pod, {"name": "main"}, {}, {}, tmp_path)
    assert spec["command"] == ["/bin/true"]
    assert spec["workingDir"] == "/"  # not root: the run's directory may not be its own
    assert spec["hostname"] == "web"
    assert spec["mounts"] == [{"source": str(tmp_path / "termination-log"), "target": "/dev/termination-log"}]


def run_of(tmp_path: Path, script: str) -> ContainerRun:
    create_run_dir(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    return ContainerRun("main", process, tmp_path / "log", tmp_path / "termination-log", "t0")


def test_poll_reports_the_exit_code_and_the_finish(tmp_path):
    run = run_of(tmp_path, "raise SystemExit(3)")
    run.process.wait(10)
    assert run.poll() == 3
    assert run.finished_at and run.finished_at.endswith("Z")


def test_a_killed_run_exits_137_as_runtimes_report(tmp_path):
    run = run_of(tmp_path, "import time; time.sleep(60)")
    assert run.poll() is None
    run.signal(signal.SIGKILL)
    run.process.wait(10)
    assert run.poll() == 137
    run.signal(signal.SIGKILL)  # an ended run ignores signals


def test_termination_message_is_cut_at_4096_bytes(tmp_path):
    run = run_of(tmp_path, "pass")
    run.message_path.write_text("x" * 5000)
    run.process.wait(10)
    run.poll()
    assert run.termination_message("File") == "x" * 4096
