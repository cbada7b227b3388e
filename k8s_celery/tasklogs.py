"""``k8s-celery logs TASK_ID``: every attempt of a task, found by its labels, and its output.

The Jobs and pods of a task carry its task hash label (:func:`~.manifest.task_selector`),
so no pod name is guessed. Each attempt's pod gets a header (pod, node, phase, exit
code or reason) and then its task container's log; ``--follow`` follows a running one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import BinaryIO

from . import outcome as outcomes
from .cluster import ApiError, KubeApi, collection_path, load_configuration, object_path
from .config import Settings
from .errors import ConfigError
from .manifest import ANNOTATION_TASK_ID, LABEL_ATTEMPT, task_selector

NOTHING_LEFT = (
    "no Job of task {task_id} is left in namespace {namespace}. A successful task's Job is deleted "
    "right after its ack, a failed one's after K8S_CELERY_KEEP_FAILED_JOBS. Look in the worker's log "
    "(its pods' output is relayed there: K8S_CELERY_POD_LOGS), in your cluster's log store, and in "
    "the result backend (state and traceback: celery result {task_id}).")


def task_attempts(api: KubeApi, namespace: str, task_id: str) -> list[tuple[dict, list[dict]]]:
    """The task's Jobs, oldest attempt first, each with its pods (two LISTs by the task's
    label; the Job's annotation holds the whole task id, so a hash clash is ruled out)."""
    selector = task_selector(task_id)
    jobs, _ = api.list(collection_path("jobs", namespace), label_selector=selector)
    jobs = [job for job in jobs if (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID) == task_id]
    pods, _ = api.list(collection_path("pods", namespace), label_selector=selector)
    by_job: dict[str, list[dict]] = {job["metadata"]["uid"]: [] for job in jobs}
    for pod in sorted(pods, key=lambda pod: pod["metadata"].get("creationTimestamp", "")):
        if _owner_uid(pod) in by_job:
            by_job[_owner_uid(pod)].append(pod)
    jobs.sort(key=lambda job: (_attempt(job), job["metadata"].get("creationTimestamp", "")))
    return [(job, by_job[job["metadata"]["uid"]]) for job in jobs]


def header(pod: dict) -> str:
    """One line naming the attempt: pod, node, phase, and how its task container ended."""
    meta, status = pod["metadata"], pod.get("status") or {}
    state = outcomes.container_state(pod)
    parts = [f"attempt {_attempt(pod)}: pod {meta['name']}",
             f"node {pod.get('spec', {}).get('nodeName') or '(not scheduled)'}",
             f"phase {status.get('phase', 'Unknown')}"]
    if "terminated" in state:
        ended = state["terminated"]
        parts.append(f"exit code {ended.get('exitCode')} ({ended.get('reason', 'Terminated')})")
    elif "waiting" in state:
        parts.append(f"waiting: {state['waiting'].get('reason', '')}")
    if status.get("reason"):
        parts.append(f"{status['reason']}: {status.get('message', '').strip()}".rstrip(": "))
    if meta.get("deletionTimestamp"):
        parts.append("being deleted")
    return "==> " + ", ".join(parts) + " <=="


def podless_header(job: dict) -> str:
    """The line for an attempt whose pod is gone (evicted and deleted, its node lost)."""
    condition = outcomes.job_condition(job)
    ended = (f", {condition['type']}: {condition.get('reason', '')} {condition.get('message', '')}".rstrip()
             if condition else "")
    return (f"==> attempt {_attempt(job)}: Job {job['metadata']['name']}{ended}; its pod is gone, and its "
            "output with it (the worker's log has it when K8S_CELERY_POD_LOGS relayed it) <==")


def print_logs(api: KubeApi, namespace: str, task_id: str, follow: bool = False,
               all_attempts: bool = False, out: BinaryIO | None = None) -> int:
    """Print the task's attempts' logs to ``out``; 1 if none is left."""
    out = out or sys.stdout.buffer
    attempts = task_attempts(api, namespace, task_id)
    if not attempts:
        out.write(NOTHING_LEFT.format(task_id=task_id, namespace=namespace).encode() + b"\n")
        return 1
    for job, pods in attempts if all_attempts else attempts[-1:]:
        if not pods:
            out.write(podless_header(job).encode() + b"\n")
        for pod in pods:
            out.write(header(pod).encode() + b"\n")
            out.flush()
            params = {"container": outcomes.task_container_name(pod)}
            if follow and pod is attempts[-1][1][-1]:
                params["follow"] = "true"
            try:
                for chunk in api.stream(object_path("pods", namespace, pod["metadata"]["name"], "log"),
                                        params, read_timeout=None if "follow" in params else 30.0):
                    out.write(chunk)
                    out.flush()
            except ApiError as exc:
                out.write(f"(no log: {exc.message or exc})\n".encode())
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k8s-celery logs",
                                     description="Print a task's pod logs, one attempt after another.")
    parser.add_argument("task_id")
    parser.add_argument("-f", "--follow", action="store_true", help="follow the running attempt")
    parser.add_argument("--all-attempts", action="store_true",
                        help="every attempt's pod, not only the latest")
    parser.add_argument("--namespace")
    parser.add_argument("--kubeconfig")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(None, namespace=args.namespace,
                                 kubeconfig=args.kubeconfig or os.environ.get("K8S_CELERY_KUBECONFIG"))
        api = KubeApi(load_configuration(settings.kubeconfig, settings.kube_context))
        return print_logs(api, settings.resolved_namespace(), args.task_id, args.follow, args.all_attempts)
    except (ConfigError, ApiError) as exc:
        print(f"k8s-celery logs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _attempt(obj: dict) -> int:
    try:
        return int((obj["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, 0))
    except ValueError:
        return 0


def _owner_uid(pod: dict) -> str | None:
    return next((ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or []
                 if ref.get("kind") == "Job"), None)
