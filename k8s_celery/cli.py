"""``k8s-celery worker | run-task | render | check | logs``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

import yaml

from .config import ManifestStore, Settings
from .errors import ConfigError

POOL = "k8s_celery.pool:KubernetesPool"


def worker(argv: list[str]) -> int:
    """The stock ``celery worker`` with the Kubernetes pool and its required options."""
    parser = argparse.ArgumentParser(
        prog="k8s-celery worker", add_help=True,
        description="Run a Celery worker whose tasks each run as a Kubernetes Job. "
                    "Unknown options are passed to `celery worker`.")
    parser.add_argument("-A", "--app", required=True, help="the Celery app, as for celery -A")
    parser.add_argument("-Q", "--queues", required=True, help="comma-separated queues to consume")
    parser.add_argument("--manifests", help="directory of <queue>/manifest.json|yaml")
    parser.add_argument("--namespace", help="namespace of the Jobs (default: the pod's own)")
    parser.add_argument("--max-jobs", type=int, default=None,
                        help="most Jobs in flight at once (the pool's concurrency; default 10)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or $KUBECONFIG)")
    known, passthrough = parser.parse_known_args(argv)
    if any(arg in ("-P", "--pool") or arg.startswith(("--pool=", "-c", "--concurrency"))
           for arg in passthrough):
        parser.error("--pool and --concurrency are set by k8s-celery worker (use --max-jobs)")
    env = {"K8S_CELERY_APP": known.app, "CELERY_CUSTOM_WORKER_POOL": POOL}
    if known.manifests:
        env["K8S_CELERY_MANIFESTS_DIR"] = os.path.abspath(known.manifests)
    if known.namespace:
        env["K8S_CELERY_NAMESPACE"] = known.namespace
    if known.kubeconfig:
        env["K8S_CELERY_KUBECONFIG"] = os.path.abspath(known.kubeconfig)
    os.environ.update(env)
    try:
        settings = Settings.load()
        ManifestStore(settings).check([q.strip() for q in known.queues.split(",") if q.strip()])
    except ConfigError as exc:
        print(f"k8s-celery: configuration error: {exc}", file=sys.stderr)
        return 2
    celery_argv = ["celery", "-A", known.app, "worker", "-P", "custom", "-Q", known.queues,
                   "--concurrency", str(known.max_jobs or 10), "--prefetch-multiplier", "1",
                   "--task-events", *passthrough]
    from celery.bin.celery import main as celery_main

    sys.argv = celery_argv
    return celery_main() or 0


def run_task(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k8s-celery run-task",
                                     description="Run one task in a pod (used by the Jobs).")
    parser.add_argument("-A", "--app", help="the Celery app (default: $K8S_CELERY_APP)")
    parser.add_argument("--payload", help="payload file (default: $K8S_CELERY_PAYLOAD_JSON, the payload "
                        "itself, else the file $K8S_CELERY_PAYLOAD)")
    parser.add_argument("--termination-log", help="where to write the outcome")
    args = parser.parse_args(argv)
    from .runner import run

    return run(args.payload, args.app, args.termination_log)


def render(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k8s-celery render",
                                     description="Print the Job and Secret a task would get.")
    parser.add_argument("-A", "--app", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--task", required=True, help="registered task name")
    parser.add_argument("--args", default="[]", help="JSON list of positional arguments")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    parser.add_argument("--task-id", default=None)
    parser.add_argument("--manifests", help="directory of <queue>/manifest.json|yaml")
    parser.add_argument("--namespace")
    args = parser.parse_args(argv)
    from .render import render_task

    try:
        documents = render_task(app_name=args.app, queue=args.queue, task_name=args.task,
                                args=json.loads(args.args), kwargs=json.loads(args.kwargs),
                                task_id=args.task_id or str(uuid.uuid4()),
                                manifests_dir=args.manifests, namespace=args.namespace)
    except (ConfigError, ValueError, KeyError) as exc:
        print(f"k8s-celery render: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump_all(documents, sys.stdout, sort_keys=False)
    return 0


def check(argv: list[str]) -> int:
    from .check import main as check_main

    return check_main(argv)


def logs(argv: list[str]) -> int:
    from .tasklogs import main as logs_main

    return logs_main(argv)


COMMANDS = {"worker": worker, "run-task": run_task, "render": render, "check": check, "logs": logs}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: k8s-celery {worker,run-task,render,check,logs} [options]\n\n"
              "  worker    run the Celery worker whose tasks run as Kubernetes Jobs\n"
              "  run-task  run one task inside a Job's pod\n"
              "  render    print the Job and Secret a task would get\n"
              "  check     validate configuration, manifests and RBAC\n"
              "  logs      print a task's pod logs, one attempt after another",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
