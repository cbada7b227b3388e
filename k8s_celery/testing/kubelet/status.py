"""The pod status, built the way the kubelet reports it.

Container statuses are sorted by container name, as the kubelet sorts them (so the
first one need not be the first container of the spec); each is waiting, running or
terminated. An evicted pod carries the ``DisruptionTarget`` condition, and a pod that
the kubelet failed (eviction, active deadline) its reason and message.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .faults import PodFault
from .objects import NODE_IP, now
from .process import ContainerRun


def _by_name(containers: list[dict]) -> list[dict]:
    return sorted(containers, key=lambda c: c["name"])


def waiting_statuses(containers: list[dict], reason: str, message: str = "") -> dict:
    """Container statuses of a pod none of whose containers started: all waiting for ``reason``."""
    waiting = {"reason": reason, **({"message": message} if message else {})}
    return {"containerStatuses": [
        {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
         "started": False, "restartCount": 0, "state": {"waiting": waiting}}
        for c in _by_name(containers)]}


def image_pull_waits(image: str) -> Iterator[tuple[str, str]]:
    """What the containers of a pod whose image cannot be pulled wait for, turn by turn."""
    while True:
        yield "ErrImagePull", (f'Failed to pull image "{image}": rpc error: code = NotFound '
                               f'desc = failed to resolve reference "{image}": not found')
        yield "ImagePullBackOff", f'Back-off pulling image "{image}"'


def termination_message(run: ContainerRun, container: dict, fault: PodFault | None,
                        simulated_message: str | None = None) -> str:
    """The message a run's terminated state reports: none after a crash, the simulated
    one in simulation mode, else what the container left under its policy."""
    if fault and fault.kind == "crash":
        return ""
    if simulated_message is not None:
        return simulated_message
    return run.termination_message(container.get("terminationMessagePolicy", "File"))


def terminated_state(run: ContainerRun, fault: PodFault | None, message: str) -> dict:
    """The ``terminated`` state of an ended run (exit code 137 if it never reported one)."""
    if fault and fault.kind == "oom":
        reason = "OOMKilled"
    elif fault and fault.kind == "evict":
        reason = "ContainerStatusUnknown" if run.exit_code is None else "Error"
    else:
        reason = "Completed" if run.exit_code == 0 else "Error"
    state = {"exitCode": run.exit_code if run.exit_code is not None else 137, "reason": reason,
             "startedAt": run.started_at, "finishedAt": run.finished_at or now(),
             "containerID": _container_id(run)}
    if message:
        state["message"] = message
    return state


def _container_id(run: ContainerRun) -> str:
    return f"process://{run.process.pid if run.process else 0}"


def container_statuses(containers: list[dict], runs: dict[str, ContainerRun],
                       restarts: dict[str, int], last_state: dict[str, dict],
                       terminated: Callable[[ContainerRun, dict], dict]) -> dict:
    """Container statuses of a pod whose containers started: a container without a run
    is waiting (PodInitializing), a running one ready, an ended one ``terminated(run,
    container)``."""
    statuses = []
    for container in _by_name(containers):
        run = runs.get(container["name"])
        status: dict[str, Any] = {
            "name": container["name"], "image": container.get("image", ""), "imageID": "",
            "restartCount": restarts.get(container["name"], 0)}
        if container["name"] in last_state:
            status["lastState"] = last_state[container["name"]]
        if run is None:
            status.update(ready=False, started=False, state={"waiting": {"reason": "PodInitializing"}})
        elif run.exit_code is None:
            status.update(ready=True, started=True, containerID=_container_id(run),
                          state={"running": {"startedAt": run.started_at}})
        else:
            status.update(ready=False, started=False, state={"terminated": terminated(run, container)})
        statuses.append(status)
    return {"containerStatuses": statuses}


def pod_status(phase: str, start_time: str, fault: PodFault | None, statuses: dict) -> dict:
    """The pod's ``status``: phase, addresses, conditions and the container ``statuses``."""
    ready = "True" if phase == "Running" else "False"
    conditions = [
        {"type": "PodReadyToStartContainers", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": ready},
        {"type": "Ready", "status": ready},
    ]
    if fault and fault.kind == "evict":
        conditions.append({"type": "DisruptionTarget", "status": "True",
                           "reason": "TerminationByKubelet", "message": fault.message})
    for condition in conditions:
        condition.setdefault("lastTransitionTime", now())
    status = {"phase": phase, "hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}],
              "podIP": NODE_IP, "podIPs": [{"ip": NODE_IP}], "startTime": start_time,
              "conditions": conditions, **statuses}
    if fault and fault.kind in ("evict", "deadline") and phase == "Failed":
        status["reason"], status["message"] = fault.reason, fault.message
    return status
