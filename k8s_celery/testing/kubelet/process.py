"""Container processes: starting one run of a container, and what it leaves behind.

Each run of a container gets a directory on the node holding its ``spec.json``, its
``log`` and its ``termination-log``. The process is ``python -m
k8s_celery.testing.container spec.json`` (see :mod:`k8s_celery.testing.container`),
which mounts the volumes, applies the security context and execs the command, in
its own session so that the whole process group can be signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .objects import now
from .resolver import expand
from .security import security_context

TERMINATION_MESSAGE_LIMIT = 4096
LOG_FALLBACK_LIMIT = 2048
TERMINATION_LOG = "termination-log"


class ContainerRun:
    """One run of one container: its process, log and termination-message file."""

    def __init__(self, name: str, process: subprocess.Popen | None, log_path: Path,
                 message_path: Path, started_at: str):
        self.name = name
        self.process = process
        self.log_path = log_path
        self.message_path = message_path
        self.started_at = started_at
        self.finished_at: str | None = None
        self.exit_code: int | None = None

    @classmethod
    def start(cls, name: str, run_dir: Path, spec: dict, helper_env: dict[str, str]) -> ContainerRun:
        """Start the container process described by ``spec`` (see :func:`container_spec`)
        in ``run_dir`` (made by :func:`create_run_dir`), its output going to ``log``."""
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = run_dir / "log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "k8s_celery.testing.container", str(spec_path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env=helper_env)
        return cls(name, process, log_path, run_dir / TERMINATION_LOG, now())

    def signal(self, signum: int) -> None:
        """Signal the run's process group, if it is still running."""
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def poll(self) -> int | None:
        """The exit code once the process has ended (as a runtime reports it: 137 for
        SIGKILL), else None."""
        if self.exit_code is None and self.process is not None:
            code = self.process.poll()
            if code is not None:
                self.exit_code = 128 - code if code < 0 else code  # -9 -> 137, as runtimes report
                self.finished_at = now()
                self._reap_group()
        return self.exit_code

    def _reap_group(self) -> None:
        # Children the command left behind die with their container.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def termination_message(self, policy: str) -> str:
        """The termination message under ``terminationMessagePolicy`` ``policy``: the
        file's content, or for ``FallbackToLogsOnError`` a failed run's last log lines."""
        try:
            with open(self.message_path, "rb") as handle:
                message = handle.read(TERMINATION_MESSAGE_LIMIT).decode(errors="replace")
        except OSError:
            message = ""
        if not message and policy == "FallbackToLogsOnError" and self.exit_code:
            try:
                data = self.log_path.read_bytes()[-LOG_FALLBACK_LIMIT:]
                message = "\n".join(data.decode(errors="replace").splitlines()[-80:])
            except OSError:
                pass
        return message


def create_run_dir(run_dir: Path) -> Path:
    """Create the directory of one container run and its empty termination-message file;
    return that file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    message_path = run_dir / TERMINATION_LOG
    message_path.write_bytes(b"")
    message_path.chmod(0o666)  # as a real kubelet: the container may run as any user
    return message_path


def container_spec(pod: dict, container: dict, env: dict[str, str], mounts: dict[str, Path],
                   run_dir: Path) -> dict:
    """What :mod:`k8s_celery.testing.container` runs: the command with ``$(VAR)``
    expanded, environment, working directory, security context, hostname and the bind
    mounts (``mounts`` maps volume names to their directories on the node)."""
    security = security_context(pod["spec"], container)
    command = [expand(part, env) for part in
               (container.get("command") or []) + (container.get("args") or [])]
    return {
        "command": command or ["/bin/true"],
        "env": env,
        "workingDir": container.get("workingDir") or (str(run_dir) if not security["uid"] else "/"),
        "security": security,
        "hostname": pod["spec"].get("hostname") or pod["metadata"]["name"],
        "mounts": [{"source": str(mounts[m["name"]] / m["subPath"]) if m.get("subPath")
                    else str(mounts[m["name"]]),
                    "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))}
                   for m in container.get("volumeMounts") or [] if m["name"] in mounts]
        + [{"source": str(run_dir / TERMINATION_LOG),
            "target": container.get("terminationMessagePath") or "/dev/termination-log"}],
    }
