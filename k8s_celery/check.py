"""``k8s-celery check``: is this worker able to run? Each check prints PASS or FAIL, and WARN
for what does not stop the worker but an operator should know (a namespace without Pod Security)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import kueue
from .cluster import ApiError, KubeApi, collection_path, load_configuration, object_path
from .config import ManifestStore, Settings
from .errors import ConfigError

#: Every verb the worker uses, and why.
REQUIRED_ACCESS = (
    ("batch", "jobs", "create", "launch a task's Job"),
    ("batch", "jobs", "get", "read a Job created by an earlier delivery"),
    ("batch", "jobs", "list", "find a task's Jobs on redelivery, relist the watch"),
    ("batch", "jobs", "watch", "follow every Job of the worker with one watch"),
    ("batch", "jobs", "delete", "remove finished Jobs, terminate revoked tasks"),
    ("batch", "jobs", "patch", "keep a failed task's Job for a post-mortem"),
    ("", "pods", "list", "find a Job's pod on adoption, relist the watch"),
    ("", "pods", "watch", "follow every task pod with one watch"),
    ("", "pods", "patch", "wake the kubelet for a pod whose payload Secret came after it"),
    ("", "pods/log", "get", "relay a task pod's output into the worker's log"),
    ("", "events", "list", "say what Kubernetes reported about a pod that never ran or was lost"),
    ("", "secrets", "create", "hand each task's payload to its pod"),
    ("kueue.x-k8s.io", "localqueues", "get", "check that a queue's LocalQueue exists (only under Kueue)"),
    ("kueue.x-k8s.io", "workloads", "list", "see why Kueue holds a task's Job (only under Kueue)"),
    ("kueue.x-k8s.io", "workloads", "watch", "see at once a Workload Kueue deactivated (only under Kueue)"),
)


KUEUE_RESOURCES = {resource for group, resource, _, _ in REQUIRED_ACCESS if group == kueue.GROUP}

#: The namespace label that makes the API server enforce a Pod Security level on its pods.
POD_SECURITY_ENFORCE = "pod-security.kubernetes.io/enforce"


def allowed(api: KubeApi, namespace: str, group: str, resource: str, verb: str) -> bool:
    """Ask the API server (SelfSubjectAccessReview) whether this identity may ``verb``
    ``resource`` (``pods/log`` names a subresource) in ``namespace``."""
    resource, _, subresource = resource.partition("/")
    attributes = {"namespace": namespace, "group": group, "resource": resource, "verb": verb}
    if subresource:
        attributes["subresource"] = subresource
    review = api.create(collection_path("selfsubjectaccessreviews"), {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes}})
    return bool(review.get("status", {}).get("allowed"))


def access_checks(api: KubeApi, namespace: str) -> list[tuple[str, bool, str]]:
    """One SelfSubjectAccessReview per required verb: ``(what, allowed, why)``."""
    return [(f"{verb} {resource}", allowed(api, namespace, group, resource, verb), why)
            for group, resource, verb, why in REQUIRED_ACCESS]


def run_checks(app_name: str, queues: list[str], settings: Settings, out=print) -> bool:
    ok = True

    def report(passed: bool, what: str, detail: str = "", warning: bool = False) -> None:
        nonlocal ok
        ok = ok and passed
        verdict = "WARN" if warning else "PASS" if passed else "FAIL"
        out(f"{verdict}  {what}{': ' + detail if detail else ''}")

    def attempt(what: str, fn: Callable[[], str]) -> bool:
        try:
            report(True, what, fn())
            return True
        except Exception as exc:  # every failure is a FAIL line, never a traceback
            report(False, what, str(exc))
            return False

    def load_app() -> str:
        from .runner import load_app as load

        app = load(app_name)
        return f"{len([t for t in app.tasks if not t.startswith('celery.')])} tasks registered"
    attempt(f"Celery app {app_name}", load_app)
    manifests = ManifestStore(settings)
    def manifest(queue: str) -> str:
        manifests.load(queue)
        return str(manifests.path_for(queue) or "K8S_CELERY_JOB_MANIFEST")
    for queue in queues:
        attempt(f"Job manifest of queue {queue}", lambda queue=queue: manifest(queue))
    namespace = settings.resolved_namespace()
    api_holder: list[KubeApi] = []

    def connect() -> str:
        api = KubeApi(load_configuration(settings.kubeconfig, settings.kube_context))
        version = api.get("/version")
        api_holder.append(api)
        return f"{api.host}, Kubernetes {version.get('gitVersion')}"
    if attempt("API server", connect):
        api = api_holder[0]
        try:
            runs_kueue = kueue.workloads_path(api, namespace) is not None
        except ApiError:  # cannot tell: Kueue's verbs count as needed
            runs_kueue = True
        for what, allowed, why in access_checks(api, namespace):
            if not allowed and what.split()[-1] in KUEUE_RESOURCES and not runs_kueue:
                report(True, f"may not {what} in namespace {namespace}", "needed only under Kueue, "
                                                                           "which this cluster does not run")
                continue
            report(allowed, f"may {what} in namespace {namespace}", why if allowed else f"missing; needed to {why}")
        level, detail = pod_security(api, namespace)
        report(True, f"Pod Security of namespace {namespace}", detail, warning=level is None)
        for queue in queues:
            name = local_queue_name(manifests, queue)
            if name:
                attempt(f"LocalQueue {name} of queue {queue}", lambda queue=queue: local_queue(
                    api, namespace, manifests.load(queue)))
    return ok


def pod_security(api: KubeApi, namespace: str) -> tuple[str | None, str]:
    """The Pod Security level the API server enforces on the namespace's pods, and what to say
    about it; ``None`` when it enforces none or this identity may not read the namespace."""
    try:
        labels = api.get(object_path("namespaces", None, namespace))["metadata"].get("labels") or {}
    except ApiError as exc:
        return None, (f"cannot read the namespace's labels ({exc.status} {exc.reason}): whether the API "
                      f"server enforces a Pod Security level on task pods is unknown")
    level = labels.get(POD_SECURITY_ENFORCE)
    if not level:
        return None, (f"no {POD_SECURITY_ENFORCE} label: task pods get the cluster's default level "
                      f"(privileged unless configured); label the namespace "
                      f"{POD_SECURITY_ENFORCE}=restricted, which the chart's pods meet")
    return level, f"{POD_SECURITY_ENFORCE}={level}"


def local_queue_name(manifests: ManifestStore, queue: str) -> str | None:
    """The Kueue LocalQueue a queue's Jobs name (``None``: none, or no valid manifest)."""
    try:
        labels = manifests.load(queue).get("metadata", {}).get("labels") or {}
    except ConfigError:
        return None
    return labels.get(kueue.QUEUE_LABEL)


def local_queue(api: KubeApi, namespace: str, manifest: dict) -> str:
    problem = kueue.local_queue_problem(api, namespace, manifest)
    if problem:
        raise ConfigError(problem)
    return f"exists in namespace {namespace}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k8s-celery check",
                                     description="Validate configuration, manifests and RBAC.")
    parser.add_argument("-A", "--app", required=True)
    parser.add_argument("-Q", "--queues", required=True)
    parser.add_argument("--manifests")
    parser.add_argument("--namespace")
    parser.add_argument("--kubeconfig")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(None, manifests_dir=args.manifests, namespace=args.namespace,
                                 kubeconfig=args.kubeconfig or os.environ.get("K8S_CELERY_KUBECONFIG"))
    except ConfigError as exc:
        print(f"FAIL  settings: {exc}")
        return 1
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    return 0 if run_checks(args.app, queues, settings) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
