"""Prometheus metrics of the worker and its probe endpoints, on one HTTP port.

``K8S_CELERY_METRICS_PORT`` serves ``/metrics`` (Prometheus text format),
``/healthz`` and ``/readyz`` (see :mod:`k8s_celery.health`).
"""

from __future__ import annotations

import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from .health import Liveness, probe_app

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


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds would flood the log
        pass


def endpoint_app(liveness: Liveness):
    """``/healthz`` and ``/readyz`` from ``liveness``; every other path is ``/metrics``."""
    metrics, probes = make_wsgi_app(), probe_app(liveness)

    def app(environ, start_response):
        handler = probes if environ.get("PATH_INFO") in probes.paths else metrics
        return handler(environ, start_response)
    return app


def serve(port: int, liveness: Liveness, address: str = "0.0.0.0") -> WSGIServer:
    """Serve metrics and probes on ``port`` from a background thread."""
    server = make_server(address, port, endpoint_app(liveness), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="k8s-celery metrics", daemon=True).start()
    return server
