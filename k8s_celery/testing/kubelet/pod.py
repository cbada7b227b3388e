"""The lifecycle of one pod on the node, from ContainerCreating to its end.

A :class:`PodRuntime` prepares the pod's volumes, runs its init containers in order
(starting native sidecars, ``restartPolicy: Always``, beside the rest), then its
containers; it restarts exited containers as ``restartPolicy`` says, with the
crash-loop back-off; it ends the containers on graceful deletion, on a fault or when
``activeDeadlineSeconds`` passes; and it reports the pod's status at each step.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ...cluster import ApiError, object_path
from .faults import PodFault
from .objects import all_containers, now, pod_key
from .process import ContainerRun, container_spec, create_run_dir
from .resolver import required_objects
from .restarts import crash_backoff, should_restart
from .security import security_error
from .status import (container_statuses, image_pull_waits, pod_status, terminated_state, termination_message,
                     waiting_statuses)
from .volumes import prepare_volumes

if TYPE_CHECKING:
    from .node import ProcessKubelet

log = logging.getLogger(__package__)

#: How long native sidecars have to end after SIGTERM, once the containers have.
SIDECAR_GRACE_PERIOD = 2.0


class PodRuntime:
    """Runs one pod bound to this node, in its own thread."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict):
        self.kubelet = kubelet
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.namespace, self.name = pod_key(pod)
        self.dir = kubelet.root / "pods" / self.uid
        self.fault: PodFault | None = None
        self.runs: dict[str, ContainerRun] = {}
        self.sidecars: set[str] = set()  # init containers with restartPolicy Always
        self.lost = False  # the node lost the pod: no status updates, no deletion
        self.restarts: dict[str, int] = {}
        self.restart_due: dict[str, float] = {}  # container -> when its back-off ends
        self.last_state: dict[str, dict] = {}
        # Simulation mode: the message the containers end with (None: read their files).
        self.simulated_message: str | None = "" if kubelet.simulate else None
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
        """The pod object changed (a deletion timestamp, say)."""
        self.pod = pod
        self.wake.set()

    def on_deleted(self) -> None:
        """The pod object is gone: kill its containers at once."""
        self.deleted.set()
        self.kill(signal.SIGKILL)
        self.wake.set()

    def kill(self, signum: int) -> None:
        """Signal every container process of the pod."""
        with self._lock:
            for run in self.runs.values():
                run.signal(signum)

    def inject(self, fault: PodFault) -> None:
        """End the pod's containers for ``fault`` (see :class:`PodFault`)."""
        self.fault = fault
        self.kill(signal.SIGKILL)
        self.wake.set()

    @property
    def terminating(self) -> bool:
        """Whether the pod is being deleted (gracefully, or already gone)."""
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
            if self.terminating and not self.deleted.is_set() and not self.lost:
                self._finalize_deletion()
            self.kubelet._forget(self)

    def _lifecycle(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        self._report(self._waiting_statuses("ContainerCreating"))
        if self.kubelet.simulate:
            self._simulate()
            return
        bad_image = next((c["image"] for c in all_containers(self.pod)
                          if self.kubelet.is_unpullable(c.get("image", ""))), None)
        if bad_image:
            self._hold_waiting(image_pull_waits(bad_image))
            return
        config_error = next(filter(None, (security_error(spec, c) for c in all_containers(self.pod))), None)
        if config_error:
            self._hold_waiting(itertools.repeat(("CreateContainerConfigError", config_error)))
            return
        while True:
            if not self._wait_for_references():
                return
            try:
                mounts = prepare_volumes(self.pod, self.dir, self.kubelet.resolver)
                break
            except ApiError as exc:  # deleted between the check and the read: wait again
                if not exc.not_found:
                    raise
        for container in spec.get("initContainers") or []:
            if container.get("restartPolicy") == "Always":  # a native sidecar: runs beside
                self.sidecars.add(container["name"])
                self._start(container, mounts)
            elif not self._run_init_container(container, mounts):
                return
        self._run_containers(spec["containers"], mounts)

    def _simulate(self) -> None:
        """Benchmark mode: Running at once, no process; ends on :meth:`ProcessKubelet.finish`,
        which also says what the containers wrote (their logs are served as a process's)."""
        started = now()
        for container in self.pod["spec"]["containers"]:
            run_dir = self.dir / "containers" / f"{container['name']}-0"
            message_path = create_run_dir(run_dir)
            (run_dir / "log").write_bytes(b"")
            self.runs[container["name"]] = ContainerRun(container["name"], None, run_dir / "log",
                                                        message_path, started)
        self.phase = "Running"
        self._report(self._statuses())
        while not (self.terminating or self.fault or self.kubelet._simulated_end(self.uid)):
            self._sleep(1.0)
        exit_code, message, output = self.kubelet._simulated_end(self.uid) or (137, "", b"")
        for run in self.runs.values():
            if output:
                with open(run.log_path, "ab") as log:
                    log.write(output)
            run.exit_code, run.finished_at = exit_code, now()
        self.simulated_message = message
        self._finish()

    def _wait_for_references(self) -> bool:
        """Stay in ContainerCreating until every referenced Secret/ConfigMap exists."""
        while not self.terminating:
            missing = [ref for ref in required_objects(self.pod)
                       if not self.kubelet.resolver.object_exists(*ref)]
            if not missing:
                return True
            kind, name = missing[0][0], missing[0][2]
            message = f'{"secret" if kind == "secrets" else "configmap"} "{name}" not found'
            self._report(self._waiting_statuses("ContainerCreating", message))
            self._sleep(0.5)
        return False

    def _hold_waiting(self, waits: Iterator[tuple[str, str]]) -> None:
        """Report the containers waiting, for each ``(reason, message)`` of ``waits`` in
        turn, until the pod is deleted: a pod that cannot start stays so, as on a node."""
        for reason, message in waits:
            if self.terminating:
                return
            self._report(self._waiting_statuses(reason, message))
            self._sleep(2.0)

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if an event (an update, a deletion, a fault) comes."""
        self.wake.wait(seconds)
        self.wake.clear()

    def _run_init_container(self, container: dict, mounts: dict[str, Path]) -> bool:
        while True:
            run = self._start(container, mounts)
            while run.poll() is None and not self.terminating:
                self._sleep(0.05)
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
        grace_deadline, exited = None, set()
        while True:
            codes = {name: run.poll() for name, run in self.runs.items() if name not in self.sidecars}
            ended = {name for name, code in codes.items() if code is not None}
            if ended - exited and ended != set(codes):  # one ended, others run on: report it now
                self._report(self._statuses())
            exited = ended
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
            self._sleep(0.05)
        self._stop_sidecars()
        self._finish()

    def _stop_sidecars(self) -> None:
        """Native sidecars end once the regular containers have: SIGTERM, then SIGKILL."""
        runs = [self.runs[name] for name in self.sidecars if name in self.runs]
        for run in runs:
            run.signal(signal.SIGTERM)
        deadline = time.monotonic() + SIDECAR_GRACE_PERIOD
        while any(run.poll() is None for run in runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in runs:
            run.signal(signal.SIGKILL)
            run.poll()

    def _restart_exited(self, containers: list[dict], codes: dict[str, int | None], policy: str,
                        mounts: dict[str, Path]) -> bool:
        """Restart exited containers the policy restarts, after their crash-loop back-off;
        True while any container is restarted or waiting to be."""
        pending = False
        for container in containers:
            name, code = container["name"], codes[container["name"]]
            if code is None or not should_restart(policy, code):
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
        codes = [run.exit_code for name, run in self.runs.items() if name not in self.sidecars]
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

    # -- containers --------------------------------------------------------------------

    def _container(self, name: str) -> dict:
        return next(c for c in all_containers(self.pod) if c["name"] == name)

    def _start(self, container: dict, mounts: dict[str, Path]) -> ContainerRun:
        name = container["name"]
        run_dir = self.dir / "containers" / f"{name}-{self.restarts.get(name, 0)}"
        create_run_dir(run_dir)
        env = self.kubelet.resolver.container_env(self.pod, container)
        spec = container_spec(self.pod, container, env, mounts, run_dir)
        run = ContainerRun.start(name, run_dir, spec, self.kubelet.helper_env)
        with self._lock:
            self.runs[name] = run
        if self.fault or self.deleted.is_set():
            run.signal(signal.SIGKILL)
        return run

    # -- status ------------------------------------------------------------------------

    def _waiting_statuses(self, reason: str, message: str = "") -> dict:
        return waiting_statuses(self.pod["spec"]["containers"], reason, message)

    def _terminated_state(self, run: ContainerRun, container: dict) -> dict:
        fault = self.fault
        return terminated_state(run, fault, termination_message(run, container, fault, self.simulated_message))

    def _statuses(self) -> dict:
        return container_statuses(self.pod["spec"]["containers"], self.runs, self.restarts,
                                  self.last_state, self._terminated_state)

    def _report(self, statuses: dict) -> None:
        if self.lost:
            return
        status = pod_status(self.phase, self.start_time, self.fault, statuses)
        try:
            self.kubelet.api.patch(object_path("pods", self.namespace, self.name, "status"),
                                   {"status": status})
        except ApiError as exc:
            if not exc.not_found:
                log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)
