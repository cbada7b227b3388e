"""What a task would get, without a cluster: ``k8s-celery render``."""

from __future__ import annotations

import secrets

from kombu.message import Message
from kombu.serialization import dumps

from .config import ManifestStore, Settings
from .deliveries import delivery_key
from .manifest import (ANNOTATION_PAYLOAD, PAYLOAD_KEY, TaskSpec, build_job, build_secret, payload_inline,
                       task_overrides)
from .runner import load_app


def render_task(app_name: str, queue: str, task_name: str, args: list, kwargs: dict, task_id: str,
                manifests_dir: str | None = None, namespace: str | None = None) -> list[dict]:
    """The Job and the Secret (data redacted) for one call of ``task_name``; only the Job
    (its payload annotation redacted) for a queue whose payloads are inline."""
    from celery.worker.request import Request

    app = load_app(app_name)
    if task_name not in app.tasks:
        raise KeyError(f"task {task_name!r} is not registered in {app_name}")
    settings = Settings.load(app.conf, manifests_dir=manifests_dir, namespace=namespace, app=app_name)
    task = app.tasks[task_name]
    message = app.amqp.as_task_v2(task_id, task_name, args=args, kwargs=kwargs,
                                  time_limit=task.time_limit, soft_time_limit=task.soft_time_limit)
    content_type, content_encoding, body = dumps(message.body, serializer=task.serializer
                                                 or app.conf.task_serializer)
    request = Request(Message(body=body, headers=message.headers, content_type=content_type,
                              content_encoding=content_encoding, properties=message.properties,
                              delivery_info={"exchange": "", "routing_key": queue}),
                      app=app, task=task, hostname="k8s-celery-render")
    soft, hard = request.time_limits
    body = body if isinstance(body, bytes) else body.encode()
    spec = TaskSpec(task_id=task_id, name=task_name, queue=queue, request=request.request_dict, body=body,
                    delivery=delivery_key(task_id, task_name, request.request_dict, body),
                    content_type=content_type, content_encoding=content_encoding,
                    soft_time_limit=soft or task.soft_time_limit, time_limit=hard or task.time_limit,
                    overrides=task_overrides(task))
    namespace = settings.resolved_namespace()
    spec.secret_name = f"{spec.job_name}-{secrets.token_hex(3)}"  # random per launch
    job = build_job(ManifestStore(settings).load(queue), spec, namespace, app=app_name,
                    runner_command=settings.runner_command, ttl_seconds=settings.job_ttl)
    if payload_inline(job):
        annotations = job["spec"]["template"]["metadata"]["annotations"]
        annotations[ANNOTATION_PAYLOAD] = f"<redacted: {len(annotations[ANNOTATION_PAYLOAD])} bytes>"
        return [job]
    secret = build_secret(spec, namespace, job_uid="<uid of the Job>")
    secret["data"] = {PAYLOAD_KEY: f"<redacted: {len(secret['data'][PAYLOAD_KEY])} base64 bytes>"}
    return [job, secret]
