"""A small kubelet that runs each container as a local process.

:class:`ProcessKubelet` registers one Ready node, plays the scheduler for it (binds
unscheduled pods through ``pods/binding``, up to an optional pod capacity) and runs
each container's ``command``/``args`` as a local process in its own mount namespace,
with the container's environment resolved and its volumes mounted at their real
paths. It reports pod status the way a kubelet does, honours ``restartPolicy`` and
graceful deletion, and offers fault hooks (eviction, OOM kill, crash) for tests.

The image is not pulled or used: the process runs on this machine's filesystem.
Images listed as unpullable leave the pod waiting in ``ErrImagePull``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..cluster import ApiError, KubeApi, Watcher, collection_path, object_path

log = logging.getLogger(__name__)

TERMINATION_MESSAGE_LIMIT = 4096
LOG_FALLBACK_LIMIT = 2048
TERMINAL_PHASES = ("Succeeded", "Failed")


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(pod: dict) -> tuple[str, str]:
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


class PodFault:
    """Why the kubelet itself ended a pod's containers (set by the fault hooks)."""

    def __init__(self, kind: str, reason: str, message: str = "", exit_code: int = 137):
        self.kind = kind
        self.reason = reason
        self.message = message
        self.exit_code = exit_code


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

    def signal(self, signum: int) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def poll(self) -> int | None:
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


class PodRuntime:
    """Runs one pod bound to this node, in its own thread."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict):
        self.kubelet = kubelet
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.namespace, self.name = _key(pod)
        self.dir = kubelet.root / "pods" / self.uid
        self.fault: PodFault | None = None
        self.runs: dict[str, ContainerRun] = {}
        self.restarts: dict[str, int] = {}
        self.restart_due: dict[str, float] = {}  # container -> when its back-off ends
        self.last_state: dict[str, dict] = {}
        self.deleted = threading.Event()
        self.wake = threading.Event()
        self.start_time = now()
        self.phase = "Pending"
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"pod {self.namespace}/{self.name}")

    # -- events from the watch and the fault hooks -----------------------------------

    def update(self, pod: dict) -> None:
        self.pod = pod
        self.wake.set()

    def on_deleted(self) -> None:
        self.deleted.set()
        self.kill(signal.SIGKILL)
        self.wake.set()

    def kill(self, signum: int) -> None:
        with self._lock:
            for run in self.runs.values():
                run.signal(signum)

    def inject(self, fault: PodFault) -> None:
        self.fault = fault
        self.kill(signal.SIGKILL)
        self.wake.set()

    @property
    def terminating(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp")) or self.deleted.is_set()

    # -- lifecycle ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception:
            log.exception("pod %s/%s: kubelet error", self.namespace, self.name)
        finally:
            self.kill(signal.SIGKILL)
            self.finished.set()
            if self.terminating and not self.deleted.is_set():
                self._finalize_deletion()
            self.kubelet._forget(self)

    def _lifecycle(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        self._report(self._waiting_statuses("ContainerCreating"))
        if self.kubelet.simulate:
            self._simulate()
            return
        bad_image = next((c["image"] for c in self._all_containers()
                          if self.kubelet.is_unpullable(c.get("image", ""))), None)
        if bad_image:
            self._image_pull_failure(bad_image)
            return
        config_error = next(filter(None, (security_error(spec, c) for c in self._all_containers())), None)
        if config_error:
            self._config_failure(config_error)
            return
        while True:
            if not self._wait_for_references():
                return
            try:
                mounts = self._prepare_volumes()
                break
            except ApiError as exc:  # deleted between the check and the read: wait again
                if not exc.not_found:
                    raise
        for container in spec.get("initContainers") or []:
            if not self._run_init_container(container, mounts):
                return
        self._run_containers(spec["containers"], mounts)

    def _simulate(self) -> None:
        """Benchmark mode: Running at once, no process; ends on :meth:`ProcessKubelet.finish`."""
        started = now()
        for container in self.pod["spec"]["containers"]:
            self.runs[container["name"]] = ContainerRun(
                container["name"], None, self.dir / "log", self.dir / "none", started)
        self.phase = "Running"
        self._report(self._statuses())
        while not (self.terminating or self.fault or self.kubelet._simulated_end(self.uid)):
            self.wake.wait(1.0)
            self.wake.clear()
        outcome = self.kubelet._simulated_end(self.uid) or (137, "")
        for run in self.runs.values():
            run.exit_code, run.finished_at = outcome[0], now()
        self.simulated_message = outcome[1]
        self._finish()

    def _wait_for_references(self) -> bool:
        """Stay in ContainerCreating until every referenced Secret/ConfigMap exists."""
        while not self.terminating:
            missing = [ref for ref in self._references() if not self.kubelet.object_exists(*ref)]
            if not missing:
                return True
            kind, name = missing[0][0], missing[0][2]
            message = f'{"secret" if kind == "secrets" else "configmap"} "{name}" not found'
            self._report(self._waiting_statuses("ContainerCreating", message))
            self.wake.wait(0.5)
            self.wake.clear()
        return False

    def _references(self) -> set[tuple[str, str, str]]:
        refs: set[tuple[str, str, str]] = set()

        def add(kind: str, source: dict | None, name_key: str = "name") -> None:
            if source and not source.get("optional"):
                refs.add((kind, self.namespace, source[name_key]))

        for volume in self.pod["spec"].get("volumes") or []:
            add("secrets", volume.get("secret"), "secretName")
            add("configmaps", volume.get("configMap"))
            for source in (volume.get("projected") or {}).get("sources") or []:
                add("secrets", source.get("secret"))
                add("configmaps", source.get("configMap"))
        for container in self._all_containers():
            for env in container.get("env") or []:
                add("secrets", (env.get("valueFrom") or {}).get("secretKeyRef"))
                add("configmaps", (env.get("valueFrom") or {}).get("configMapKeyRef"))
            for env_from in container.get("envFrom") or []:
                add("secrets", env_from.get("secretRef"))
                add("configmaps", env_from.get("configMapRef"))
        return refs

    def _image_pull_failure(self, image: str) -> None:
        reason = "ErrImagePull"
        while not self.terminating:
            message = (f'Failed to pull image "{image}": rpc error: code = NotFound '
                       f'desc = failed to resolve reference "{image}": not found')
            if reason == "ImagePullBackOff":
                message = f'Back-off pulling image "{image}"'
            self._report(self._waiting_statuses(reason, message))
            reason = "ImagePullBackOff" if reason == "ErrImagePull" else "ErrImagePull"
            self.wake.wait(2.0)
            self.wake.clear()

    def _config_failure(self, message: str) -> None:
        while not self.terminating:
            self._report(self._waiting_statuses("CreateContainerConfigError", message))
            self.wake.wait(2.0)
            self.wake.clear()

    def _run_init_container(self, container: dict, mounts: dict[str, Path]) -> bool:
        while True:
            run = self._start(container, mounts)
            while run.poll() is None and not self.terminating:
                self.wake.wait(0.05)
                self.wake.clear()
            if self.terminating or self.fault:
                self._finish()
                return False
            if run.exit_code == 0:
                return True
            if self.pod["spec"].get("restartPolicy", "Always") == "Never":
                self._finish()
                return False
            self._record_restart(container["name"], run)

    def _run_containers(self, containers: list[dict], mounts: dict[str, Path]) -> None:
        for container in containers:
            self._start(container, mounts)
        self.phase = "Running"
        self._report(self._statuses())
        policy = self.pod["spec"].get("restartPolicy", "Always")
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        started = time.monotonic()
        grace_deadline = None
        while True:
            codes = {name: run.poll() for name, run in self.runs.items()}
            if self.fault or self.deleted.is_set():
                if all(code is not None for code in codes.values()):
                    break
            elif self.terminating:
                if grace_deadline is None:
                    self.kill(signal.SIGTERM)
                    grace = self.pod["metadata"].get("deletionGracePeriodSeconds", 30)
                    grace_deadline = time.monotonic() + min(grace, self.kubelet.max_grace_period)
                elif time.monotonic() > grace_deadline:
                    self.kill(signal.SIGKILL)
                if all(code is not None for code in codes.values()):
                    break
            elif deadline and time.monotonic() - started > deadline:
                self.fault = PodFault("deadline", "DeadlineExceeded",
                                      "Pod was active on the node longer than the specified deadline")
                self.kill(signal.SIGKILL)
            else:
                restarting = self._restart_exited(containers, codes, policy, mounts)
                if not restarting and all(code is not None for code in codes.values()):
                    break
            self.wake.wait(0.05)
            self.wake.clear()
        self._finish()

    def _restart_exited(self, containers, codes, policy, mounts) -> bool:
        """Restart exited containers the policy restarts, after their crash-loop back-off;
        True while any container is restarted or waiting to be."""
        pending = False
        for container in containers:
            name, code = container["name"], codes[container["name"]]
            if code is None or not (policy == "Always" or (policy == "OnFailure" and code != 0)):
                continue
            pending = True
            due = self.restart_due.setdefault(name, time.monotonic() + crash_backoff(self.restarts.get(name, 0)))
            if time.monotonic() < due:
                continue
            del self.restart_due[name]
            self._record_restart(name, self.runs[name])
            self._start(container, mounts)
            self._report(self._statuses())
        return pending

    def _record_restart(self, name: str, run: ContainerRun) -> None:
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.last_state[name] = {"terminated": self._terminated_state(run, self._container(name))}

    def _finish(self) -> None:
        codes = [run.exit_code for run in self.runs.values()]
        if self.fault and self.fault.kind in ("evict", "deadline"):
            self.phase = "Failed"
        elif self.runs and all(code == 0 for code in codes):
            self.phase = "Succeeded"
        else:
            self.phase = "Failed"
        if not self.deleted.is_set():
            self._report(self._statuses())

    def _finalize_deletion(self) -> None:
        try:
            self.kubelet.api.delete(object_path("pods", self.namespace, self.name),
                                    propagation=None, grace_period=0, uid=self.uid)
        except ApiError as exc:
            log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.name, exc)

    # -- processes ---------------------------------------------------------------------

    def _container(self, name: str) -> dict:
        return next(c for c in self._all_containers() if c["name"] == name)

    def _all_containers(self) -> list[dict]:
        spec = self.pod["spec"]
        return (spec.get("initContainers") or []) + spec["containers"]

    def _start(self, container: dict, mounts: dict[str, Path]) -> ContainerRun:
        name = container["name"]
        attempt = self.restarts.get(name, 0)
        cdir = self.dir / "containers" / f"{name}-{attempt}"
        cdir.mkdir(parents=True, exist_ok=True)
        message_path = cdir / "termination-log"
        message_path.write_bytes(b"")
        message_path.chmod(0o666)  # as a real kubelet: the container may run as any user
        security = security_context(self.pod["spec"], container)
        env = self.kubelet.container_env(self.pod, container)
        command = [expand(part, env) for part in
                   (container.get("command") or []) + (container.get("args") or [])]
        spec = {
            "command": command or ["/bin/true"],
            "env": env,
            "workingDir": container.get("workingDir") or (str(cdir) if not security["uid"] else "/"),
            "security": security,
            "hostname": self.pod["spec"].get("hostname") or self.name,
            "mounts": [{"source": str(mounts[m["name"]] / m["subPath"]) if m.get("subPath")
                        else str(mounts[m["name"]]),
                        "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))}
                       for m in container.get("volumeMounts") or [] if m["name"] in mounts]
            + [{"source": str(message_path),
                "target": container.get("terminationMessagePath") or "/dev/termination-log"}],
        }
        spec_path = cdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = cdir / "log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "k8s_celery.testing.container", str(spec_path)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.kubelet.helper_env)
        run = ContainerRun(name, process, log_path, message_path, now())
        with self._lock:
            self.runs[name] = run
        if self.fault or self.deleted.is_set():
            run.signal(signal.SIGKILL)
        return run

    # -- volumes -----------------------------------------------------------------------

    def _prepare_volumes(self) -> dict[str, Path]:
        mounts: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            target = self.dir / "volumes" / volume["name"]
            if "hostPath" in volume:
                mounts[volume["name"]] = Path(volume["hostPath"]["path"])
                continue
            target.mkdir(parents=True, exist_ok=True)
            files = self.kubelet.volume_files(self.pod, volume)
            owner = volume_owner(self.pod["spec"])
            for relative, (data, mode) in files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                path.chmod(mode)
                os.chown(path, *owner)
            if "emptyDir" in volume:
                target.chmod(0o777)
            mounts[volume["name"]] = target
        return mounts

    # -- status ------------------------------------------------------------------------

    def _waiting_statuses(self, reason: str, message: str = "") -> dict:
        waiting = {"reason": reason, **({"message": message} if message else {})}
        return {"containerStatuses": [
            {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
             "started": False, "restartCount": 0, "state": {"waiting": waiting}}
            for c in self.pod["spec"]["containers"]]}

    def _terminated_state(self, run: ContainerRun, container: dict) -> dict:
        fault = self.fault
        if fault and fault.kind == "crash":
            message = ""
        elif self.kubelet.simulate:
            message = getattr(self, "simulated_message", "")
        else:
            message = run.termination_message(container.get("terminationMessagePolicy", "File"))
        if fault and fault.kind == "oom":
            reason = "OOMKilled"
        elif fault and fault.kind == "evict":
            reason = "ContainerStatusUnknown" if run.exit_code is None else "Error"
        else:
            reason = "Completed" if run.exit_code == 0 else "Error"
        state = {"exitCode": run.exit_code if run.exit_code is not None else 137, "reason": reason,
                 "startedAt": run.started_at, "finishedAt": run.finished_at or now(),
                 "containerID": f"process://{run.process.pid if run.process else 0}"}
        if message:
            state["message"] = message
        return state

    def _statuses(self) -> dict:
        statuses = []
        for container in self.pod["spec"]["containers"]:
            run = self.runs.get(container["name"])
            status: dict[str, Any] = {
                "name": container["name"], "image": container.get("image", ""), "imageID": "",
                "restartCount": self.restarts.get(container["name"], 0)}
            if container["name"] in self.last_state:
                status["lastState"] = self.last_state[container["name"]]
            if run is None:
                status.update(ready=False, started=False, state={"waiting": {"reason": "PodInitializing"}})
            elif run.exit_code is None:
                status.update(ready=True, started=True, containerID=f"process://{run.process.pid if run.process else 0}",
                              state={"running": {"startedAt": run.started_at}})
            else:
                status.update(ready=False, started=False,
                              state={"terminated": self._terminated_state(run, container)})
            statuses.append(status)
        return {"containerStatuses": statuses}

    def _report(self, statuses: dict) -> None:
        ready = "True" if self.phase == "Running" else "False"
        conditions = [
            {"type": "PodReadyToStartContainers", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ]
        if self.fault and self.fault.kind == "evict":
            conditions.append({"type": "DisruptionTarget", "status": "True",
                               "reason": "TerminationByKubelet", "message": self.fault.message})
        for condition in conditions:
            condition.setdefault("lastTransitionTime", now())
        status = {"phase": self.phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                  "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "startTime": self.start_time,
                  "conditions": conditions, **statuses}
        if self.fault and self.fault.kind in ("evict", "deadline") and self.phase == "Failed":
            status["reason"], status["message"] = self.fault.reason, self.fault.message
        try:
            self.kubelet.api.patch(object_path("pods", self.namespace, self.name, "status"),
                                   {"status": status})
        except ApiError as exc:
            if not exc.not_found:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)


_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` references like the kubelet (``$$`` escapes, unknown stays)."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REFERENCE.sub(replace, value)


class ProcessKubelet:
    """A kubelet and scheduler for one local node that runs containers as processes.

    ``env`` is the base environment of every container (by default this process's
    ``PATH``); the container's own ``env``/``envFrom`` are resolved on top of it.
    ``pod_capacity`` limits the pods bound at once, leaving the rest Pending and
    Unschedulable. ``unpullable_images`` are image-name substrings whose pull fails.
    ``simulate=True`` runs no processes: pods go Running at once and end on
    :meth:`finish` (for benchmarks with many pods).
    """

    def __init__(self, api: KubeApi, root: Path, node_name: str = "local-node",
                 pod_capacity: int | None = None, env: dict[str, str] | None = None,
                 unpullable_images: tuple[str, ...] = ("unpullable",), simulate: bool = False,
                 max_grace_period: float = 30.0, api_server_port: int | None = None):
        self.api = api
        self.root = Path(root)
        self.node_name = node_name
        self.pod_capacity = pod_capacity
        self.unpullable_images = tuple(unpullable_images)
        self.simulate = simulate
        self.max_grace_period = max_grace_period
        # This machine is the "image": its Python (the one running us first) and tools.
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
        self.base_env = {"PATH": path, "LANG": "C.UTF-8", **(env or {})}
        if api_server_port:
            self.base_env.update(KUBERNETES_SERVICE_HOST="127.0.0.1",
                                 KUBERNETES_SERVICE_PORT=str(api_server_port))
        self.helper_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._pods: dict[str, dict] = {}           # uid -> latest pod object, all nodes
        self._runtimes: dict[str, PodRuntime] = {}  # uid -> runtime, this node
        self._simulated: dict[str, tuple[int, str]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._schedule_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher: Watcher | None = None

    # -- public API --------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        self.root.mkdir(parents=True, exist_ok=True)
        self._register_node()
        self._watcher = Watcher(self.api, "/api/v1/pods", self._on_event, self._on_sync,
                                resync_period=60, read_timeout=30, name="kubelet pod watch").start()
        for target, name in ((self._heartbeat, "kubelet lease"), (self._scheduler, "kubelet scheduler")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watcher.wait_synced(30)
        return self

    def stop(self) -> None:
        """Stop watching and kill every container process (the node goes away)."""
        self._stop.set()
        self._schedule_now.set()
        if self._watcher:
            self._watcher.stop(timeout=0.5)  # a daemon thread; its read may be blocked
        with self._lock:
            runtimes = list(self._runtimes.values())
        for runtime in runtimes:
            runtime.deleted.set()
            runtime.kill(signal.SIGKILL)
            runtime.wake.set()
        for runtime in runtimes:
            runtime.thread.join(10)
        for thread in self._threads:
            thread.join(2)

    def set_capacity(self, pods: int | None) -> None:
        self.pod_capacity = pods
        self._schedule_now.set()

    def evict(self, namespace: str, name: str,
              message: str = "The node was low on resource: memory. ") -> None:
        """Node-pressure eviction: kill the pod, Failed with reason Evicted."""
        self._runtime(namespace, name).inject(PodFault("evict", "Evicted", message))

    def oom_kill(self, namespace: str, name: str) -> None:
        """The kernel's OOM killer: exit 137, container reason OOMKilled."""
        self._runtime(namespace, name).inject(PodFault("oom", "OOMKilled"))

    def crash(self, namespace: str, name: str) -> None:
        """SIGKILL the containers; no termination message is reported."""
        self._runtime(namespace, name).inject(PodFault("crash", "Error"))

    def finish(self, namespace: str, name: str, exit_code: int = 0, message: str = "") -> None:
        """Simulation mode: end a pod's containers with this exit code and message."""
        runtime = self._runtime(namespace, name)
        self._simulated[runtime.uid] = (exit_code, message)
        runtime.wake.set()

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        runtime_dir = self._pod_dir(namespace, name)
        parts = sorted((runtime_dir / "containers").glob(f"{container or '*'}-*/log"))
        return "".join(p.read_text(errors="replace") for p in parts)

    def running_pods(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.namespace, r.name) for r in self._runtimes.values() if not r.finished.is_set()]

    def processes(self) -> list[int]:
        """Process ids of every container process still alive."""
        with self._lock:
            runs = [run for r in self._runtimes.values() for run in r.runs.values()]
        return [run.process.pid for run in runs if run.process and run.process.poll() is None]

    def is_unpullable(self, image: str) -> bool:
        return any(marker in image for marker in self.unpullable_images)

    # -- pod resolution helpers used by PodRuntime ------------------------------------

    def object_exists(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self.api.get(object_path(kind, namespace, name))
            return True
        except ApiError as exc:
            if exc.not_found:
                return False
            raise

    def _get_data(self, kind: str, namespace: str, name: str, optional: bool = False) -> dict[str, bytes]:
        try:
            obj = self.api.get(object_path(kind, namespace, name))
        except ApiError as exc:
            if exc.not_found and optional:
                return {}
            raise
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} \
            if kind == "secrets" else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def container_env(self, pod: dict, container: dict) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = dict(self.base_env, HOSTNAME=pod["metadata"]["name"])
        for env_from in container.get("envFrom") or []:
            for kind, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                ref = env_from.get(key)
                if ref:
                    values = self._get_data(kind, namespace, ref["name"], ref.get("optional", False))
                    prefix = env_from.get("prefix", "")
                    env.update({prefix + k: v.decode(errors="replace") for k, v in values.items()})
        for var in container.get("env") or []:
            value = self._env_value(pod, container, var, env)
            if value is not None:
                env[var["name"]] = value
        return env

    def _env_value(self, pod: dict, container: dict, var: dict, env: dict[str, str]) -> str | None:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        namespace = pod["metadata"]["namespace"]
        for kind, key in (("secrets", "secretKeyRef"), ("configmaps", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                data = self._get_data(kind, namespace, ref["name"], ref.get("optional", False))
                value = data.get(ref["key"])
                return value.decode(errors="replace") if value is not None else None
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return resource_value(container, source["resourceFieldRef"])
        return None

    def volume_files(self, pod: dict, volume: dict) -> dict[str, tuple[bytes, int]]:
        """The files (relative path -> data, mode) of a secret, configMap, downwardAPI,
        projected or emptyDir volume."""
        namespace = pod["metadata"]["namespace"]
        if "secret" in volume:
            source = volume["secret"]
            return _project(self._get_data("secrets", namespace, source["secretName"],
                                           source.get("optional", False)),
                            source.get("items"), source.get("defaultMode", 0o644))
        if "configMap" in volume:
            source = volume["configMap"]
            return _project(self._get_data("configmaps", namespace, source["name"],
                                           source.get("optional", False)),
                            source.get("items"), source.get("defaultMode", 0o644))
        if "downwardAPI" in volume:
            source = volume["downwardAPI"]
            return self._downward_files(pod, source.get("items") or [], source.get("defaultMode", 0o644))
        if "projected" in volume:
            return self._projected_files(pod, volume["projected"])
        return {}  # emptyDir and anything else: an empty directory

    def _downward_files(self, pod: dict, items: list[dict], mode: int) -> dict[str, tuple[bytes, int]]:
        files = {}
        for item in items:
            if "fieldRef" in item:
                value = field_value(pod, item["fieldRef"]["fieldPath"])
            else:
                container = next(c for c in pod["spec"]["containers"]
                                 if c["name"] == item["resourceFieldRef"].get("containerName"))
                value = resource_value(container, item["resourceFieldRef"])
            files[item["path"]] = (value.encode(), item.get("mode", mode))
        return files

    def _projected_files(self, pod: dict, projected: dict) -> dict[str, tuple[bytes, int]]:
        namespace = pod["metadata"]["namespace"]
        mode = projected.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                token = self._service_account_token(pod, source["serviceAccountToken"])
                files[source["serviceAccountToken"]["path"]] = (token.encode(), 0o600)
            elif "secret" in source:
                ref = source["secret"]
                files.update(_project(self._get_data("secrets", namespace, ref["name"],
                                                     ref.get("optional", False)), ref.get("items"), mode))
            elif "configMap" in source:
                ref = source["configMap"]
                files.update(_project(self._get_data("configmaps", namespace, ref["name"],
                                                     ref.get("optional", False)), ref.get("items"), mode))
            elif "downwardAPI" in source:
                files.update(self._downward_files(pod, source["downwardAPI"].get("items") or [], mode))
        return files

    def _service_account_token(self, pod: dict, source: dict) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [source["audience"]] if source.get("audience") else None,
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
        if request["spec"]["audiences"] is None:
            del request["spec"]["audiences"]
        answer = self.api.create(object_path("serviceaccounts", meta["namespace"], account, "token"), request)
        return answer["status"]["token"]

    # -- watch, scheduling, node -------------------------------------------------------

    def _on_sync(self, pods: list[dict]) -> None:
        with self._lock:
            seen = {pod["metadata"]["uid"] for pod in pods}
            for uid in list(self._pods):
                if uid not in seen:
                    self._on_event("DELETED", self._pods[uid])
            for pod in pods:
                self._on_event("MODIFIED", pod)

    def _on_event(self, event_type: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            runtime = self._runtimes.get(uid)
            if event_type == "DELETED":
                self._pods.pop(uid, None)
                self._simulated.pop(uid, None)
                if runtime:
                    runtime.on_deleted()
                    if runtime.finished.is_set():
                        self._discard(runtime)
                self._schedule_now.set()
                return
            self._pods[uid] = pod
            if runtime:
                runtime.update(pod)
            elif pod["spec"].get("nodeName") == self.node_name and not self._stop.is_set():
                self._adopt(pod)
            elif not pod["spec"].get("nodeName"):
                self._schedule_now.set()

    def _adopt(self, pod: dict) -> None:
        phase = pod.get("status", {}).get("phase")
        if phase in TERMINAL_PHASES or phase == "Running":
            # Ran before this kubelet started: its processes are gone; only finish deletions.
            if pod["metadata"].get("deletionTimestamp"):
                threading.Thread(target=self._delete_now, args=(pod,), daemon=True).start()
            return
        runtime = PodRuntime(self, pod)
        self._runtimes[runtime.uid] = runtime
        runtime.thread.start()

    def _delete_now(self, pod: dict) -> None:
        namespace, name = _key(pod)
        try:
            self.api.delete(object_path("pods", namespace, name), propagation=None,
                            grace_period=0, uid=pod["metadata"]["uid"])
        except ApiError as exc:
            log.warning("pod %s/%s: delete failed: %s", namespace, name, exc)

    def _forget(self, runtime: PodRuntime) -> None:
        with self._lock:
            if runtime.deleted.is_set() or self._stop.is_set():
                self._discard(runtime)
        self._schedule_now.set()

    def _discard(self, runtime: PodRuntime) -> None:
        """Forget a pod that ended and was deleted; remove its files."""
        self._runtimes.pop(runtime.uid, None)
        shutil.rmtree(runtime.dir, ignore_errors=True)

    def _runtime(self, namespace: str, name: str) -> PodRuntime:
        with self._lock:
            for runtime in self._runtimes.values():
                if (runtime.namespace, runtime.name) == (namespace, name):
                    return runtime
        raise LookupError(f"pod {namespace}/{name} is not running on {self.node_name}")

    def _pod_dir(self, namespace: str, name: str) -> Path:
        with self._lock:
            for runtime in self._runtimes.values():
                if (runtime.namespace, runtime.name) == (namespace, name):
                    return runtime.dir
            for pod in self._pods.values():
                if _key(pod) == (namespace, name):
                    return self.root / "pods" / pod["metadata"]["uid"]
        raise LookupError(f"pod {namespace}/{name} is unknown to {self.node_name}")

    def _simulated_end(self, uid: str) -> tuple[int, str] | None:
        return self._simulated.get(uid)

    def _active_pods(self) -> int:
        return sum(1 for r in self._runtimes.values() if r.phase not in TERMINAL_PHASES)

    def _scheduler(self) -> None:
        while not self._stop.is_set():
            self._schedule_now.wait(1.0)
            self._schedule_now.clear()
            try:
                self._schedule_pending()
            except Exception:
                log.exception("kubelet scheduler pass failed")

    def _schedule_pending(self) -> None:
        with self._lock:
            pending = sorted(
                (p for p in self._pods.values()
                 if not p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
                 and p["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"),
                key=lambda p: p["metadata"]["creationTimestamp"])
            free = None if self.pod_capacity is None else self.pod_capacity - self._active_pods()
        for pod in pending:
            namespace, name = _key(pod)
            if free is not None and free <= 0:
                self._mark_unschedulable(pod)
                continue
            try:
                self.api.create(object_path("pods", namespace, name, "binding"), {
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
            except ApiError as exc:
                if not (exc.not_found or exc.conflict):
                    log.warning("binding %s/%s failed: %s", namespace, name, exc)
                continue
            if free is not None:
                free -= 1

    def _mark_unschedulable(self, pod: dict) -> None:
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "PodScheduled" and c["status"] == "False" for c in conditions):
            return
        namespace, name = _key(pod)
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "lastTransitionTime": now(),
                     "message": "0/1 nodes are available: 1 Too many pods. "
                                "preemption: 0/1 nodes are available: 1 No preemption victims found "
                                "for incoming pod."}
        try:
            self.api.patch(object_path("pods", namespace, name, "status"),
                           {"status": {"conditions": [condition]}})
        except ApiError:
            pass

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.node_name, "labels": {"kubernetes.io/hostname": self.node_name,
                                               "kubernetes.io/os": "linux",
                                               "kubernetes.io/arch": "amd64"}}}
        try:
            self.api.create("/api/v1/nodes", node)
        except ApiError as exc:
            if not exc.conflict:
                raise
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi",
                    "pods": str(self.pod_capacity or 1000)}
        self.api.patch(object_path("nodes", None, self.node_name, "status"), {"status": {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "process kubelet is posting ready status",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "nodeInfo": {"kubeletVersion": "v1.33.13-process", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "process://1", "kernelVersion": os.uname().release,
                         "osImage": "local", "machineID": "", "systemUUID": "", "bootID": ""}}})

    def _heartbeat(self) -> None:
        path = object_path("leases", "kube-node-lease", self.node_name)
        while not self._stop.is_set():
            renew = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                              "renewTime": renew}}
            try:
                try:
                    self.api.patch(path, {"spec": lease["spec"]}, strategy="merge-patch")
                except ApiError as exc:
                    if not exc.not_found:
                        raise
                    self.api.create(collection_path("leases", "kube-node-lease"), lease)
            except ApiError as exc:
                log.warning("node lease renewal failed: %s", exc)
            self._stop.wait(10)


def crash_backoff(restarts: int) -> float:
    """Seconds before the next restart of a container restarted ``restarts`` times: the
    kubelet's 10 s doubling to 5 min (here the first restart is immediate)."""
    return 0.0 if restarts == 0 else min(10.0 * 2 ** (restarts - 1), 300.0)


def security_context(pod_spec: dict, container: dict) -> dict:
    """What the container runs as: the pod's securityContext overlaid by the container's.

    The "image" here runs as root unless told otherwise, so ``uid`` defaults to 0.
    """
    pod_level = pod_spec.get("securityContext") or {}
    own = container.get("securityContext") or {}

    def pick(key: str, default=None):
        return own.get(key, pod_level.get(key, default))
    groups = [g for g in [pod_level.get("fsGroup"), *(pod_level.get("supplementalGroups") or [])]
              if g is not None]
    return {"uid": pick("runAsUser", 0), "gid": pick("runAsGroup", 0), "groups": groups,
            "runAsNonRoot": bool(pick("runAsNonRoot", False)),
            "readOnlyRootFilesystem": bool(own.get("readOnlyRootFilesystem", False)),
            "noNewPrivileges": own.get("allowPrivilegeEscalation") is False}


def security_error(pod_spec: dict, container: dict) -> str | None:
    """The kubelet's refusal to start a container, as CreateContainerConfigError says it."""
    security = security_context(pod_spec, container)
    if security["runAsNonRoot"] and security["uid"] == 0:
        if "runAsUser" in (container.get("securityContext") or {}) or \
                "runAsUser" in (pod_spec.get("securityContext") or {}):
            return "container's runAsUser breaks non-root policy"
        return "container has runAsNonRoot and image will run as root"
    return None


def volume_owner(pod_spec: dict) -> tuple[int, int]:
    """Who owns volume files: the pod's runAsUser, group fsGroup (-1: leave as is)."""
    pod_level = pod_spec.get("securityContext") or {}
    return pod_level.get("runAsUser", -1), pod_level.get("fsGroup", -1)


def _project(data: dict[str, bytes], items: list[dict] | None, mode: int) -> dict[str, tuple[bytes, int]]:
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    return {item["path"]: (data[item["key"]], item.get("mode", mode)) for item in items if item["key"] in data}


_LABEL_FIELD = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def field_value(pod: dict, path: str) -> str:
    """Value of a downward-API ``fieldRef`` path."""
    meta = pod["metadata"]
    match = _LABEL_FIELD.fullmatch(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
              "status.hostIPs": "127.0.0.1"}
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path!r}")
    return simple[path]


def resource_value(container: dict, ref: dict) -> str:
    """Value of a ``resourceFieldRef`` (the declared value, or the node's size)."""
    kind, _, name = ref["resource"].partition(".")
    declared = (container.get("resources") or {}).get(kind, {}).get(name)
    if declared is not None:
        return str(declared)
    return str(os.cpu_count() or 1) if name == "cpu" else str(16 * 2**30)
