"""Prometheus metrics of the worker (``K8S_CELERY_METRICS_PORT`` serves them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS_LAUNCHED = Counter("k8s_celery_jobs_launched", "Jobs created for tasks", ["queue", "task"])
TASK_OUTCOMES = Counter("k8s_celery_task_outcomes", "Task attempts by outcome "
                        "(succeeded, failed, retried, rejected, ignored, lost, requeued, revoked)",
                        ["queue", "task", "outcome"])
IN_FLIGHT = Gauge("k8s_celery_jobs_in_flight", "Tasks whose Job is launching or running")
LAUNCH_SECONDS = Histogram("k8s_celery_launch_seconds", "From the task reaching the pool to its Job created",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ACK_SECONDS = Histogram("k8s_celery_ack_seconds", "From the pod's end seen by the watch to the message acked",
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
API_ERRORS = Counter("k8s_celery_kubernetes_api_errors", "Error answers of the Kubernetes API", ["status"])


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a background thread."""
    start_http_server(port, addr=address)
