"""The Celery execution pool that runs every task as a Kubernetes Job.

Plugged into the stock Celery worker (``worker_pool = "k8s_celery.pool:KubernetesPool"``,
or ``-P custom`` with ``CELERY_CUSTOM_WORKER_POOL``), so that Celery's consumer,
events, heartbeats, remote control, revokes and ETA handling stay Celery's own.

This module is Celery's pool interface and the wiring of the parts; the path of one
message through them is described in ``docs/architecture.md``:
:mod:`.deliveries` (what is in flight) → :mod:`.reconciler` with :mod:`.launcher`
(Job created or adopted) → :mod:`.informer` (watches → cache) → :mod:`.reconciler`
(outcome decided) → :mod:`.hub` (Celery's callbacks on its event loop: ack, events).
"""

from __future__ import annotations

import logging
import os
import signal as signals
import time
from typing import Any

from celery.concurrency.base import BasePool

from . import health, kueue, metrics
from .brokers import Broker, for_app
from .cluster import KubeApi, RateLimiter, load_configuration
from .config import ManifestStore, Settings
from .deliveries import CeleryRequest, Delivery, DeliveryTable, Phase, delivery_key
from .errors import ConfigError
from .hub import TERMINATED, LoopBridge, Reporter
from .informer import Informer
from .launcher import Launcher
from .maintenance import Maintenance, Sweeper
from .manifest import TaskSpec, body_bytes
from .outcome import Outcome
from .postmortem import PostMortem
from .reconciler import Reconciler
from .workqueue import WorkQueue

log = logging.getLogger(__name__)


class KubernetesPool(BasePool):
    """Runs each task of the worker's queues as its own Kubernetes Job."""

    signal_safe = False
    is_green = False
    task_join_will_block = False
    body_can_be_buffer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = Settings.load(self.app.conf if self.app else None)
        self.manifests = ManifestStore(self.settings)
        self.namespace = self.settings.resolved_namespace()
        self.table = DeliveryTable(self.limit or 1)
        self.bridge = LoopBridge()
        self.counters = {"launched": 0, "succeeded": 0, "failed": 0, "lost": 0, "requeued": 0, "adopted": 0}
        self.reporter = Reporter(self.app, self.settings, self.counters)
        self.liveness = health.Liveness(self.settings.liveness_timeout)
        self._liveness_timer = None
        self.broker: Broker = for_app(self.app)
        self.broker.install()
        self.api: KubeApi | None = None
        self.informer: Informer | None = None
        self.queue: WorkQueue | None = None
        self.reconciler: Reconciler | None = None
        self.maintenance: Maintenance | None = None
        self.app_name: str | None = None

    @property
    def limit_value(self) -> int:
        return self.table.limit

    # -- lifecycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        queues = self.consumed_queues()
        missing = [q for q in queues if not self.manifests.has_manifest(q)]
        if missing:
            raise ConfigError(f"no Job manifest for queue(s) {', '.join(missing)} in "
                              f"{self.settings.manifests_dir} (and K8S_CELERY_JOB_MANIFEST is unset)")
        self.manifests.check(queues)
        self.app_name = self.settings.app or os.environ.get("K8S_CELERY_APP") or _guess_app_name(self.app)
        if not self.app_name:
            raise ConfigError("cannot tell which Celery app the pods should load: "
                              "set K8S_CELERY_APP or the k8s_celery_app setting")
        self._force_task_options()
        for warning in self.broker.warnings():
            log.warning(warning)
        self.api = KubeApi(load_configuration(self.settings.kubeconfig, self.settings.kube_context),
                           rate_limiter=RateLimiter(self.settings.api_qps, self.settings.api_burst),
                           on_error=lambda error: metrics.API_ERRORS.labels(str(error.status)).inc())
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_port, self.liveness)
        self._wire()
        self.post_mortem.check_access()
        kueue.warn_of_local_queues(self.api, self.namespace, {q: self.manifests.load(q) for q in queues})
        self.informer.start()
        if not self.informer.wait_synced(60):
            raise ConfigError(f"cannot list Jobs/Pods in namespace {self.namespace} at {self.api.host}: "
                              "see the log above")
        self.queue.start()
        self.maintenance.start()
        log.info("k8s-celery pool: namespace %s, queues %s, at most %d Jobs in flight",
                 self.namespace, ", ".join(queues), self.table.limit)

    def _wire(self) -> None:
        self.queue = WorkQueue(self._reconcile, workers=self.settings.launch_threads)
        self.informer = Informer(self.api, self.namespace, self._on_job_change, self.settings.watch_resync,
                                 workloads_path=kueue.watched_workloads(self.api, self.namespace))
        launcher = Launcher(self.api, self.namespace, self.settings, self.manifests, self.app,
                            self.app_name, self.counters)
        self.post_mortem = PostMortem(self.api, self.namespace, self.settings, self.informer.cache)
        self.reconciler = Reconciler(self.table, self.informer.cache, launcher, self.api, self.namespace,
                                     self.settings, self.bridge, self.reporter, self.queue.add,
                                     self.queue.add_after, self._on_slot_freed, self.post_mortem)
        self.maintenance = Maintenance(self.table, self.informer.cache, self.broker,
                                       Sweeper(self.api, self.namespace, self.app, self.settings, self.informer.cache),
                                       self.queue.add, self.settings)

    def on_stop(self) -> None:
        """Wait up to the drain time for running Jobs, then stop watching.

        Jobs still running are left alone and their messages unacknowledged: Celery
        returns them to the queue and the next worker adopts the Jobs.
        """
        self._drain(self.settings.drain_timeout)
        if self.reconciler is not None:  # remove the Jobs of tasks acked meanwhile
            self.post_mortem.stop()  # relay the output of the ended ones first
            self.bridge.drain()
            for delivery in self.table:
                if delivery.ended:
                    self.reconciler.reconcile(delivery.key)
        for part in (self.maintenance, self.queue, self.informer):
            if part is not None:
                part.stop()
        self.bridge.close()
        left = len(self.table)
        if left:
            log.warning("k8s-celery pool stopping with %d task(s) in flight; their Jobs keep "
                        "running and the next worker adopts them", left)

    def on_terminate(self) -> None:
        self.settings.drain_timeout = 0
        self.on_stop()

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.table.clear_waiting()  # never launched: Celery gives their messages back
        while time.monotonic() < deadline:
            self.bridge.drain()
            if not any(d.phase is not Phase.ENDED for d in self.table):
                break
            time.sleep(0.05)
        self.bridge.drain()

    def register_with_event_loop(self, loop) -> None:
        """Called each time the consumer (re)starts its loop: listen for finished tasks
        and tick the liveness clock from the loop itself."""
        self.bridge.attach(loop)
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
        self.liveness.tick()
        self._liveness_timer = loop.call_repeatedly(self.liveness.tick_interval, self.liveness.tick)

    def worker_settings(self, queues: list[str]) -> dict:
        """What the pod's start-up signals need of this worker (see ``runner.start_worker_process``):
        its hostname (Celery hands it to the pool as ``initargs``), log level and ``queues``."""
        initargs = self.options.get("initargs") or (None, None)
        return {"hostname": initargs[1] if len(initargs) > 1 else None,
                "loglevel": logging.getLogger().getEffectiveLevel(), "queues": queues}

    def consumed_queues(self) -> list[str]:
        try:
            return sorted(self.app.amqp.queues.consume_from or self.app.amqp.queues)
        except AttributeError:
            return []

    def _force_task_options(self) -> None:
        # Ack only at the pod's end, and requeue when the pod is lost.
        for task in self.app.tasks.values():
            task.acks_late = True
            task.reject_on_worker_lost = True

    # -- Celery's pool interface ------------------------------------------------------

    def on_apply(self, target, args=None, kwargs=None, callback=None, accept_callback=None,
                 error_callback=None, timeout_callback=None, soft_timeout=None, timeout=None,
                 **options) -> Delivery:
        name, task_id, request, body, content_type, content_encoding = args[:6]
        body = body_bytes(body, content_encoding)
        queues = self.consumed_queues()
        spec = TaskSpec(task_id=task_id, name=name, queue=_queue_of(self.app, request, queues),
                        request=request, body=body, content_type=content_type,
                        content_encoding=content_encoding, delivery=delivery_key(task_id, name, request, body),
                        soft_time_limit=soft_timeout or self.options.get("soft_timeout"),
                        time_limit=timeout or self.options.get("timeout"), worker=self.worker_settings(queues))
        celery_request = CeleryRequest(accept_callback, callback, error_callback, timeout_callback)
        delivery = self.table.add(Delivery(spec, celery_request, self._on_terminate))
        metrics.IN_FLIGHT.set(len(self.table))
        if delivery.spec is not spec:  # the same message is already here: one Job answers both
            log.info("task %s[%s] delivered again while in flight; joining its Job", name, task_id)
            if delivery.accepted:
                self.reporter.accept(delivery, celery_request)
        elif delivery.phase is Phase.LAUNCHING:
            self.queue.add(delivery.key)
        return delivery

    def terminate_job(self, pid, signal=None) -> None:
        """``pid`` is the pod's name; decide once Celery has announced why (revoke or cancel)."""
        delivery = self.table.find_pod(pid)
        if delivery is not None:
            self.bridge.call(self._on_terminate, delivery, signal)

    def _on_terminate(self, delivery: Delivery, signal: int | None) -> None:
        """``revoke(terminate=True)`` deletes the Job; a cancel (connection lost, cold
        shutdown) leaves it running for the redelivered message to adopt."""
        with self.table.lock:
            if delivery.ended or delivery.cancelled or delivery.terminate_signal is not None:
                return
            if _is_revocation(delivery):
                delivery.terminate_signal = int(signal or signals.SIGTERM)
            else:
                delivery.cancelled = True
            waiting = self.table.drop_waiting(delivery)
        if waiting:
            if delivery.terminate_signal is not None:
                delivery.phase = Phase.ENDED
                self.bridge.call(self.reporter.report, delivery, Outcome(TERMINATED))
            return
        self.queue.add(delivery.key)

    def grow(self, n: int = 1) -> None:
        self.table.resize(self.table.limit + n)
        self.limit = self.table.limit
        self._start_waiting()

    def shrink(self, n: int = 1) -> None:
        self.table.resize(self.table.limit - n)
        self.limit = self.table.limit

    def restart(self) -> None:
        log.info("pool restart: nothing to restart, every task runs in its own Job")

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        deliveries = list(self.table)
        info.update({
            "max-concurrency": self.table.limit,
            "in-flight": self.table.slots_used,
            "queued": self.table.waiting,
            "suspended": sum(1 for d in deliveries if d.queued_since is not None),
            "namespace": self.namespace,
            "jobs": [d.info() for d in deliveries],
            "processes": [d.pod_name for d in deliveries if d.pod_name],
            "counters": dict(self.counters),
        })
        return info

    @property
    def num_processes(self) -> int:
        return self.table.limit

    # -- slots and keys ----------------------------------------------------------------

    def _on_slot_freed(self) -> None:
        metrics.IN_FLIGHT.set(len(self.table))
        self.bridge.call(self._start_waiting)

    def _start_waiting(self) -> None:
        """Launch waiting deliveries while slots are free (on the event loop). A request
        revoked or expired while it waited is announced by Celery and never launched,
        as prefork does when a pool process frees up."""
        while (delivery := self.table.next_waiting()) is not None:
            delivery.requests = [r for r in delivery.requests if not _revoked(r)]
            if delivery.requests:
                self.queue.add(delivery.key)
            else:
                self.table.remove(delivery)
        metrics.IN_FLIGHT.set(len(self.table))

    def _on_job_change(self, job_name: str) -> None:
        delivery = self.table.by_job(job_name)
        if delivery is not None:
            self.queue.add(delivery.key)

    def _reconcile(self, key: str) -> None:
        self.reconciler.reconcile(key)


def _queue_of(app, request: dict, queues: list[str]) -> str:
    """The consumed queue a message came from, from its exchange and routing key."""
    from .routing import queue_of

    return queue_of(app, request.get("delivery_info") or {}, queues)


def _revoked(request: CeleryRequest) -> bool:
    celery_request = request.request
    return bool(celery_request is not None and celery_request.revoked())


def _is_revocation(delivery: Delivery) -> bool:
    """Did Celery revoke the task (terminate), rather than cancel its request?"""
    from celery.worker import state

    for request in delivery.requests:
        celery_request = request.request
        if celery_request is None:
            return True
        if getattr(celery_request, "_already_revoked", False) or \
                getattr(celery_request, "_terminate_on_ack", None) is not None or \
                celery_request.id in state.revoked:
            return True
    return False


#: What the pods load when the worker is Nautobot's (``nautobot-server celery worker``, no ``-A``).
NAUTOBOT_APP = "k8s_celery.contrib.nautobot"


def _guess_app_name(app) -> str | None:
    """The ``-A`` value the worker was started with, for the pods to load; for Nautobot's
    app, the module that loads Nautobot's settings first, as ``nautobot-server`` does."""
    import sys

    argv = sys.argv
    for index, arg in enumerate(argv):
        if arg in ("-A", "--app") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
        if arg.startswith("-A") and len(arg) > 2:
            return arg[2:]
    if type(app).__module__ == "nautobot.core.celery":
        return NAUTOBOT_APP
    return None
