"""The Celery execution pool that runs every task as a Kubernetes Job.

Plugged into the stock Celery worker (``worker_pool = "k8s_celery.pool:KubernetesPool"``,
or ``-P custom`` with ``CELERY_CUSTOM_WORKER_POOL``), so that Celery's consumer,
events, heartbeats, remote control, revokes and ETA handling stay Celery's own.

``apply_async`` turns the task into a payload Secret and a Job and returns at once;
the message stays unacknowledged. One watch on Jobs and one on Pods (for the whole
worker) report progress: the pod running calls ``accept_callback`` (``task-started``),
its end calls the callbacks Celery gave, which ack, requeue or reject the message
and emit the task events exactly as they do for a local worker process.
"""

from __future__ import annotations

import logging
import os
import signal as signals
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.concurrency.base import BasePool
from celery.exceptions import Ignore, Reject, Retry, Terminated

from . import health, metrics
from . import outcome as outcomes
from .cluster import ApiError, KubeApi, RateLimiter, Watcher, collection_path, load_configuration, object_path
from .config import ManifestStore, Settings
from .errors import (ConfigError, PodPendingTimeout, TaskLaunchError, TaskLostError)
from .manifest import (ANNOTATION_TASK_ID, LABEL_ATTEMPT, MANAGED_SELECTOR, TaskSpec, build_job, build_secret,
                       task_overrides, task_selector)

log = logging.getLogger(__name__)

JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
PENDING_TIMEOUT = "PENDING_TIMEOUT"
LAUNCH_FAILED = "LAUNCH_FAILED"
REQUEUE = "REQUEUE"
TERMINATED = "TERMINATED"


OUTCOME_LABELS = {outcomes.SUCCESS: "succeeded", outcomes.FAILURE: "failed", outcomes.RETRY: "retried",
                  outcomes.REJECTED: "rejected", outcomes.IGNORED: "ignored", outcomes.LOST: "lost",
                  outcomes.TIME_LIMIT: "failed", PENDING_TIMEOUT: "failed", LAUNCH_FAILED: "failed",
                  REQUEUE: "requeued", TERMINATED: "revoked"}


class Callbacks:
    """The callbacks Celery passed with one delivery of a task."""

    def __init__(self, accept: Callable | None, success: Callable | None, error: Callable | None,
                 timeout: Callable | None):
        self.accept = accept
        self.success = success
        self.error = error
        self.timeout = timeout
        self.accepted = False


class InFlight:
    """One task whose Job is queued, launching or running.

    Returned by :meth:`KubernetesPool.apply_async`; Celery keeps a weak reference
    and calls :meth:`terminate` on ``revoke(terminate=True)``.
    """

    def __init__(self, pool: KubernetesPool, spec: TaskSpec, callbacks: Callbacks):
        self.pool = pool
        self.spec = spec
        self.deliveries = [callbacks]
        self.received = time.monotonic()
        self.launched_at: float | None = None
        self.job_created_at: float | None = None
        self._job: dict | None = None
        self._pod: dict | None = None
        self.job_deleted = False
        self.accepted = False
        self.finished = False
        self.lost_before = 0
        self.terminate_signal: int | None = None
        self.ended_at: float | None = None
        self.settling = False

    # Only what the pool reads of the Job and pod is kept: a worker holds them for every
    # task in flight, and their spec, labels and managedFields are most of their size.
    @property
    def job(self) -> dict | None:
        return self._job

    @job.setter
    def job(self, job: dict | None) -> None:
        self._job = _slim(job)

    @property
    def pod(self) -> dict | None:
        return self._pod

    @pod.setter
    def pod(self, pod: dict | None) -> None:
        self._pod = _slim(pod, _pod_status)

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def job_name(self) -> str:
        return self.spec.job_name

    @property
    def pod_name(self) -> str | None:
        return self.pod["metadata"]["name"] if self.pod else None

    def terminate(self, signal: int | None = None) -> None:
        self.pool.terminate_entry(self, signal or signals.SIGTERM)

    def info(self) -> dict:
        phase = (self.pod or {}).get("status", {}).get("phase") if self.pod else None
        return {"id": self.task_id, "name": self.spec.name, "queue": self.spec.queue,
                "job": self.job_name if self.launched_at else None, "pod": self.pod_name,
                "phase": phase or ("Queued" if not self.launched_at else "Pending"),
                "attempt": self.spec.attempt}


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
        self._templates: dict[str, tuple[Any, dict]] = {}
        self.namespace = self.settings.resolved_namespace()
        self.limit = self.limit or 1
        self.api: KubeApi | None = None
        self._lock = threading.RLock()
        self._by_job: dict[str, InFlight] = {}
        self._by_task: dict[str, InFlight] = {}
        self._waiting: deque[InFlight] = deque()
        self._active = 0
        self._ready: deque[tuple[Callable, tuple]] = deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._hub = None
        self.liveness = health.Liveness(self.settings.liveness_timeout)
        self._liveness_timer = None
        self._executor: ThreadPoolExecutor | None = None
        self._watchers: list[Watcher] = []
        self._stopping = threading.Event()
        self._maintenance: threading.Thread | None = None
        self.counters = {"launched": 0, "succeeded": 0, "failed": 0, "lost": 0, "requeued": 0,
                         "adopted": 0}

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
        for warning in broker_warnings(self.app):
            log.warning(warning)
        self.api = KubeApi(load_configuration(self.settings.kubeconfig, self.settings.kube_context),
                           rate_limiter=RateLimiter(self.settings.api_qps, self.settings.api_burst),
                           on_error=lambda error: metrics.API_ERRORS.labels(str(error.status)).inc())
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_port, self.liveness)
        self._executor = ThreadPoolExecutor(self.settings.launch_threads, thread_name_prefix="k8s-launch")
        self._watchers = [
            Watcher(self.api, collection_path("jobs", self.namespace), self._on_job_event,
                    self._on_job_sync, label_selector=MANAGED_SELECTOR,
                    resync_period=self.settings.watch_resync, name="k8s-celery job watch"),
            Watcher(self.api, collection_path("pods", self.namespace), self._on_pod_event,
                    self._on_pod_sync, label_selector=MANAGED_SELECTOR,
                    resync_period=self.settings.watch_resync, name="k8s-celery pod watch"),
        ]
        for watcher in self._watchers:
            watcher.start()
        for watcher in self._watchers:
            if not watcher.wait_synced(60):
                raise ConfigError(f"cannot list Jobs/Pods in namespace {self.namespace} "
                                  f"at {self.api.host}: see the log above")
        self._maintenance = threading.Thread(target=self._maintain, name="k8s-celery maintenance",
                                             daemon=True)
        self._maintenance.start()
        log.info("k8s-celery pool: namespace %s, queues %s, at most %d Jobs in flight",
                 self.namespace, ", ".join(queues), self.limit)

    def on_stop(self) -> None:
        """Wait up to the drain time for running Jobs, then stop watching.

        Jobs still running are left alone and their messages unacknowledged: Celery
        returns them to the queue and the next worker adopts the Jobs.
        """
        self._drain(self.settings.drain_timeout)
        self._stopping.set()
        for watcher in self._watchers:
            watcher.stop(timeout=1.0)
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = len(self._by_job) + len(self._waiting)
        if left:
            log.warning("k8s-celery pool stopping with %d task(s) in flight; their Jobs keep "
                        "running and the next worker adopts them", left)

    def on_terminate(self) -> None:
        self.settings.drain_timeout = 0
        self.on_stop()

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            self._waiting.clear()  # not launched: Celery gives their messages back
        while time.monotonic() < deadline:
            self._drain_ready()
            with self._lock:
                if not self._by_job:
                    break
            time.sleep(0.05)
        self._drain_ready()

    def register_with_event_loop(self, loop) -> None:
        """Called each time the consumer (re)starts its loop: listen for finished tasks
        and tick the liveness clock from the loop itself."""
        self._hub = loop
        loop.add_reader(self._wake_read, self._drain_ready)
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
        self.liveness.tick()
        self._liveness_timer = loop.call_repeatedly(self.liveness.tick_interval, self.liveness.tick)

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
                 **options) -> InFlight:
        name, task_id, request, body, content_type, content_encoding = args[:6]
        callbacks = Callbacks(accept_callback, callback, error_callback, timeout_callback)
        spec = TaskSpec(task_id=task_id, name=name, queue=self._queue_of(request), request=request,
                        body=body, content_type=content_type, content_encoding=content_encoding,
                        soft_time_limit=soft_timeout, time_limit=timeout)
        with self._lock:
            current = self._by_task.get(task_id)
            if current is not None and not current.finished:
                # A second delivery of a task already here: run it once, answer both.
                log.info("task %s[%s] delivered again while in flight; joining its Job",
                         name, task_id)
                current.deliveries.append(callbacks)
                if current.accepted:
                    self._notify(self._accept_delivery, current, callbacks)
                return current
            entry = InFlight(self, spec, callbacks)
            self._by_task[task_id] = entry
            metrics.IN_FLIGHT.set(len(self._by_task))
            if self._active < self.limit:
                self._active += 1
                self._submit(self._launch, entry)
            else:
                self._waiting.append(entry)
        return entry

    def terminate_job(self, pid, signal=None) -> None:
        with self._lock:
            entry = next((e for e in self._by_task.values() if e.pod_name == pid), None)
        if entry is not None:
            self.terminate_entry(entry, signal or signals.SIGTERM)

    def terminate_entry(self, entry: InFlight, signum: int) -> None:
        """Delete the task's Job (its pods die) and report it terminated."""
        with self._lock:
            if entry.finished or entry.terminate_signal is not None:
                return
            entry.terminate_signal = int(signum)
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._finish(entry, outcomes.Outcome(TERMINATED), slot=False)
                return
        log.info("terminating %s[%s]: deleting Job %s", entry.spec.name, entry.task_id, entry.job_name)
        with self._lock:
            if entry.launched_at is not None:  # else _launch finishes it once the Job exists
                self._finish(entry, outcomes.Outcome(TERMINATED))  # its clean-up deletes the Job

    def grow(self, n: int = 1) -> None:
        with self._lock:
            self.limit += n
        self._start_waiting()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            self.limit = max(1, self.limit - n)

    def restart(self) -> None:
        log.info("pool restart: nothing to restart, every task runs in its own Job")

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        with self._lock:
            entries = list(self._by_task.values())
            info.update({
                "max-concurrency": self.limit,
                "in-flight": self._active,
                "queued": len(self._waiting),
                "namespace": self.namespace,
                "jobs": [entry.info() for entry in entries],
                "processes": [entry.pod_name for entry in entries if entry.pod_name],
                "counters": dict(self.counters),
            })
        return info

    @property
    def num_processes(self) -> int:
        return self.limit

    # -- launching ---------------------------------------------------------------------

    def _queue_of(self, request: dict) -> str:
        delivery = request.get("delivery_info") or {}
        routing_key = delivery.get("routing_key")
        queues = self.consumed_queues()
        if routing_key in queues:
            return routing_key
        try:
            for queue in self.app.amqp.queues.consume_from.values():
                if queue.routing_key == routing_key:
                    return queue.name
        except AttributeError:
            pass
        return queues[0] if len(queues) == 1 else (routing_key or "celery")

    def _submit(self, fn: Callable, *args) -> None:
        if self._executor is None or self._stopping.is_set():
            return
        future = self._executor.submit(fn, *args)
        future.add_done_callback(_log_unexpected)

    def _launch(self, entry: InFlight) -> None:
        spec = entry.spec
        try:
            template = self._template(spec.queue)
            spec.overrides = task_overrides(self.app.tasks.get(spec.name))
            # A first delivery has no Job yet: create it at once, and look for earlier
            # attempts only when the message was redelivered or the name is taken.
            created = not _redelivered(spec) and self._create(entry, template, exclusive=True)
            if not created and not self._adopt(entry, self._existing_jobs(spec.task_id)):
                self._create(entry, template)
            if entry.terminate_signal is not None and not entry.finished:
                self._finish_locked(entry, outcomes.Outcome(TERMINATED))  # clean-up deletes the Job
        except (ConfigError, TaskLaunchError) as exc:
            self._fail_launch(entry, exc)
        except ApiError as exc:
            if exc.retryable:
                log.error("cannot reach Kubernetes for %s[%s] (%s); requeueing the task",
                          spec.name, spec.task_id, exc)
                self._finish_locked(entry, outcomes.Outcome(REQUEUE, reason=str(exc)))
            else:
                self._fail_launch(entry, TaskLaunchError(f"Kubernetes refused the Job: {exc}"))
        except Exception as exc:  # never let one task take the worker down
            log.exception("unexpected error launching %s[%s]", spec.name, spec.task_id)
            self._fail_launch(entry, TaskLaunchError(f"unexpected error launching the Job: {exc!r}"))

    def _template(self, queue: str) -> dict:
        """The queue's manifest, looked at on every launch, validated again only when it changed.

        Validating against the OpenAPI schema costs about 10 ms of CPU a launch; the
        file's inode, size and times tell whether it changed. ``build_job`` copies it.
        """
        source = self.manifests.path_for(queue)
        fallback = self.settings.job_manifest
        if source is None and fallback and os.path.isfile(fallback):
            source = fallback
        if source is None:
            stamp: Any = fallback  # the manifest itself, from the environment
        else:
            stat = os.stat(source)
            stamp = (str(source), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        cached = self._templates.get(queue)
        if cached is None or cached[0] != stamp:
            cached = self._templates[queue] = (stamp, self.manifests.load(queue))
        return cached[1]

    def _existing_jobs(self, task_id: str) -> list[dict]:
        jobs, _ = self.api.list(collection_path("jobs", self.namespace), label_selector=task_selector(task_id))
        return sorted(jobs, key=_attempt_of)

    def _adopt(self, entry: InFlight, jobs: list[dict]) -> bool:
        """Reuse what an earlier delivery left; ``True`` when no new Job is needed."""
        spec = entry.spec
        for job in reversed(jobs):
            if outcomes.job_condition(job) is None and not job["metadata"].get("deletionTimestamp"):
                spec.attempt = _attempt_of(job)
                log.info("adopting running Job %s for %s[%s]", spec.job_name, spec.name, spec.task_id)
                self._track(entry, job)
                self._ensure_secret(entry, job)
                self._refresh_pods(entry)
                with self._lock:
                    self.counters["adopted"] += 1
                return True
        lost = []
        for job in jobs:
            pod = self._latest_pod(job["metadata"]["name"])
            result = outcomes.classify(job, pod)
            if result and result.state != outcomes.LOST:
                spec.attempt = _attempt_of(job)
                log.info("%s[%s] already ran in Job %s (%s); reporting that outcome",
                         spec.name, spec.task_id, spec.job_name, result.state)
                self._track(entry, job, pod)
                self._evaluate(entry)
                return True
            lost.append(result.reason if result else "unknown")
        if not jobs and self._already_succeeded(entry):
            return True
        entry.lost_before = len(lost)
        spec.attempt = (_attempt_of(jobs[-1]) + 1) if jobs else 1
        if entry.lost_before >= self.settings.max_lost_attempts:
            self._finish_locked(entry, outcomes.Outcome(outcomes.LOST, reason=lost[-1]))
            return True
        return False

    def _already_succeeded(self, entry: InFlight) -> bool:
        """A redelivered message of a task whose Job already succeeded and was removed.

        That happens when the broker redelivers a message whose ack it never got
        (visibility timeout, connection loss) after the Job was cleaned up; like
        Celery's ``worker_deduplicate_successful_tasks``, trust the result backend.
        """
        spec = entry.spec
        if not _redelivered(spec):
            return False
        backend = self.app.backend
        if not getattr(backend, "persistent", False):
            return False
        meta = backend.get_task_meta(spec.task_id)
        if meta.get("status") != "SUCCESS":
            return False
        from celery.utils.saferepr import saferepr

        log.info("%s[%s] redelivered after it succeeded; not running it again", spec.name, spec.task_id)
        self._finish_locked(entry, outcomes.Outcome(outcomes.SUCCESS, result=saferepr(meta.get("result"))))
        return True

    def _create(self, entry: InFlight, template: dict, exclusive: bool = False) -> bool:
        """Create the task's Job and payload Secret; ``False`` if ``exclusive`` and the Job exists."""
        spec = entry.spec
        build_secret(spec, self.namespace)  # fail oversized payloads before creating anything
        job = build_job(template, spec, self.namespace, app=self.app_name,
                        runner_command=self.settings.runner_command, ttl_seconds=self.settings.job_ttl)
        self._track(entry, None)
        try:
            created = self.api.create(collection_path("jobs", self.namespace), job)
        except ApiError as exc:
            if not exc.conflict or exclusive:
                with self._lock:
                    self._by_job.pop(spec.job_name, None)
                if exc.conflict:
                    return False
                raise
            created = self.api.get(object_path("jobs", self.namespace, spec.job_name))
        with self._lock:
            if entry.job is None:
                entry.job = created
            entry.job_created_at = time.monotonic()
        self._ensure_secret(entry, created)
        metrics.JOBS_LAUNCHED.labels(spec.queue, spec.name).inc()
        metrics.LAUNCH_SECONDS.observe(time.monotonic() - entry.received)
        with self._lock:
            self.counters["launched"] += 1
        log.info("task %s[%s] -> Job %s/%s", spec.name, spec.task_id, self.namespace, spec.job_name)
        return True

    def _ensure_secret(self, entry: InFlight, job: dict) -> None:
        secret = build_secret(entry.spec, self.namespace, job_uid=job["metadata"]["uid"])
        try:
            self.api.create(collection_path("secrets", self.namespace), secret)
        except ApiError as exc:
            if not exc.conflict:
                raise

    def _track(self, entry: InFlight, job: dict | None, pod: dict | None = None) -> None:
        with self._lock:
            entry.launched_at = time.monotonic()
            if job is not None:
                entry.job = job
                entry.job_created_at = entry.launched_at
            if pod is not None:
                entry.pod = pod
            self._by_job[entry.job_name] = entry

    def _refresh_pods(self, entry: InFlight) -> None:
        pod = self._latest_pod(entry.job_name)
        with self._lock:
            if pod is not None:
                entry.pod = pod
            self._evaluate(entry)

    def _latest_pod(self, job_name: str) -> dict | None:
        pods, _ = self.api.list(collection_path("pods", self.namespace),
                                label_selector=f"{JOB_NAME_LABELS[0]}={job_name}")
        return max(pods, key=lambda p: p["metadata"]["creationTimestamp"], default=None)

    def _fail_launch(self, entry: InFlight, exc: Exception) -> None:
        log.error("task %s[%s] cannot run as a Job: %s", entry.spec.name, entry.task_id, exc)
        self._finish_locked(entry, outcomes.Outcome(LAUNCH_FAILED, reason=str(exc)), error=exc)

    def _delete_job(self, name: str) -> None:
        try:
            self.api.delete(object_path("jobs", self.namespace, name), propagation="Background")
        except ApiError as exc:
            log.warning("cannot delete Job %s: %s", name, exc)

    def _cleanup_task(self, entry: InFlight, slot: bool = False) -> None:
        """Delete every Job (and so its pods and payload Secret) of a finished task."""
        try:
            # List rather than trust entry.job_name: a redelivery may have adopted a later
            # attempt's Job, created by a worker that died, which must go too.
            for job in self._existing_jobs(entry.task_id):
                self._delete_job(job["metadata"]["name"])
        except ApiError as exc:  # the TTL controller removes it later
            log.warning("cannot clean up the Jobs of task %s: %s", entry.task_id, exc)
        finally:
            self._release(slot)

    # -- watch events ------------------------------------------------------------------

    def _on_job_event(self, event_type: str, job: dict) -> None:
        with self._lock:
            entry = self._by_job.get(job["metadata"]["name"])
            if entry is None or entry.finished:
                return
            if event_type == "DELETED":
                entry.job_deleted = True
            else:
                entry.job = job
            self._evaluate(entry)

    def _on_job_sync(self, jobs: list[dict]) -> None:
        names = {job["metadata"]["name"]: job for job in jobs}
        with self._lock:
            for name, entry in list(self._by_job.items()):
                if name in names:
                    entry.job = names[name]
                elif entry.job_created_at is not None:
                    entry.job_deleted = True
                self._evaluate(entry)

    def _on_pod_event(self, event_type: str, pod: dict) -> None:
        labels = pod["metadata"].get("labels") or {}
        job_name = next((labels[key] for key in JOB_NAME_LABELS if key in labels), None)
        with self._lock:
            entry = self._by_job.get(job_name) if job_name else None
            if entry is None or entry.finished:
                return
            if entry.pod is None or event_type != "DELETED" or \
                    entry.pod["metadata"]["uid"] == pod["metadata"]["uid"]:
                entry.pod = pod
            self._evaluate(entry)

    def _on_pod_sync(self, pods: list[dict]) -> None:
        for pod in pods:
            self._on_pod_event("MODIFIED", pod)

    def _evaluate(self, entry: InFlight, settled: bool = False) -> None:
        """Called with the lock held whenever the Job or pod of ``entry`` changed."""
        if entry.finished:
            return
        phase = (entry.pod or {}).get("status", {}).get("phase")
        if phase == "Running" and not entry.accepted:
            self._accept(entry)
        result = outcomes.classify(entry.job, entry.pod, entry.job_deleted)
        if result is None:
            return
        if result.state == outcomes.LOST and not settled:
            # The Job watch can report the end before the pod watch delivers the pod's
            # last status: read the pod itself before calling the attempt lost.
            if not entry.settling:
                entry.settling = True
                self._submit(self._settle, entry)
            return
        self._finish(entry, result)

    def _settle(self, entry: InFlight) -> None:
        try:
            pod = self._latest_pod(entry.job_name)
        except ApiError as exc:
            log.warning("cannot read the pod of Job %s: %s", entry.job_name, exc)
            pod = None
        with self._lock:
            if pod is not None:
                entry.pod = pod
            entry.settling = False
            self._evaluate(entry, settled=True)

    def _accept(self, entry: InFlight) -> None:
        entry.accepted = True
        for delivery in entry.deliveries:
            self._notify(self._accept_delivery, entry, delivery)

    def _maintain(self) -> None:
        """Time out Jobs whose pod never starts; keep reservations fresh; sweep leftovers."""
        next_refresh = next_sweep = time.monotonic()
        while not self._stopping.wait(1.0):
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + self._refresh_reservations()
            if now >= next_sweep:
                next_sweep = now + self.settings.sweep_interval
                self._submit(self._sweep)
            self._time_out_pending(now)

    def _time_out_pending(self, now: float) -> None:
        with self._lock:
            stuck = [e for e in self._by_job.values()
                     if not e.accepted and not e.finished and e.job_created_at is not None
                     and now - e.job_created_at > self.settings.pending_timeout]
            for entry in stuck:
                reason = outcomes.pending_reason(entry.pod)
                log.error("task %s[%s]: pod not running after %.0fs (%s); deleting Job %s",
                          entry.spec.name, entry.task_id, self.settings.pending_timeout,
                          reason, entry.job_name)
                self._finish(entry, outcomes.Outcome(PENDING_TIMEOUT, reason=reason))

    def _refresh_reservations(self) -> float:
        """Touch the broker's reservation of every message in flight here.

        Redis (kombu) redelivers an unacknowledged message once it is older than the
        visibility timeout, whether or not its consumer lives; refreshing the score
        in ``unacked_index`` keeps long Jobs from being delivered again while this
        worker lives, so a short visibility timeout still recovers fast after a
        crash. Returns how long to wait before the next refresh.
        """
        with self._lock:
            deliveries = [d for entry in self._by_task.values() for d in entry.deliveries]
        channels: dict[int, tuple[Any, list]] = {}
        for delivery in deliveries:
            message = getattr(getattr(delivery.success, "__self__", None), "message", None)
            channel = getattr(message, "channel", None)
            if channel is None or not hasattr(channel, "unacked_index_key"):
                continue
            channels.setdefault(id(channel), (channel, []))[1].append(message.delivery_tag)
        # Nothing held: look again in a second, so that a new message is refreshed in time.
        interval = 30.0 if channels else 1.0
        for channel, tags in channels.values():
            interval = min(interval, max(1.0, channel.visibility_timeout / 4))
            try:
                with channel.conn_or_acquire() as client:
                    client.zadd(channel.unacked_index_key, {tag: time.time() for tag in tags}, xx=True)
            except Exception as exc:  # the broker is away: Celery reconnects, we try again
                log.warning("cannot refresh %d message reservation(s): %s", len(tags), exc)
                interval = 1.0
        return interval

    def _sweep(self) -> None:
        """Delete finished Jobs that no live task needs any more.

        A worker killed between the ack and its clean-up leaves its Job behind. Such
        a Job is deleted once it has been finished for the grace period *and* the
        result backend holds the task's final state; a Job of a task that is still
        to be retried (a lost attempt) stays, since it counts the attempts. The
        TTL controller removes whatever is left after ``job_ttl``.
        """
        from celery import states

        jobs, _ = self.api.list(collection_path("jobs", self.namespace), label_selector=MANAGED_SELECTOR)
        cutoff = time.time() - self.settings.sweep_grace
        with self._lock:
            owned = set(self._by_job)
        for job in jobs:
            name = job["metadata"]["name"]
            condition = outcomes.job_condition(job)
            if name in owned or condition is None:
                continue
            if _timestamp(condition.get("lastTransitionTime")) > cutoff:
                continue
            task_id = (job["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID)
            if task_id and self.app.backend.get_task_meta(task_id).get("status") in states.READY_STATES:
                log.info("sweeping Job %s of finished task %s", name, task_id)
                self._delete_job(name)

    # -- finishing ---------------------------------------------------------------------

    def _finish_locked(self, entry: InFlight, result: outcomes.Outcome, error: Exception | None = None) -> None:
        with self._lock:
            self._finish(entry, result, error=error)

    def _finish(self, entry: InFlight, result: outcomes.Outcome, error: Exception | None = None,
                slot: bool = True) -> None:
        if entry.finished:
            return
        entry.finished = True
        if entry.terminate_signal is not None and result.state != TERMINATED:
            result = outcomes.Outcome(TERMINATED)
        self._by_task.pop(entry.task_id, None)
        self._by_job.pop(entry.job_name, None)
        metrics.IN_FLIGHT.set(len(self._by_task))
        entry.ended_at = time.monotonic()
        for delivery in entry.deliveries:
            self._notify(self._deliver, entry, delivery, result, error)
        requeued = result.state == REQUEUE or (
            result.state == outcomes.LOST and not self._final_loss(entry, result))
        if requeued:
            # Lost attempts stay until the task ends: they count the attempts.
            self._release(slot)
        else:
            # After the acks (same FIFO): a Job deleted before its message is acked
            # could let a redelivery run the task again. The slot frees once the Job
            # is gone, so that at most `limit` Jobs ever exist.
            self._notify(self._submit, self._cleanup_task, entry, slot)

    def _release(self, slot: bool = True) -> None:
        if slot:
            with self._lock:
                self._active -= 1
        self._start_waiting()

    def _final_loss(self, entry: InFlight, result: outcomes.Outcome) -> bool:
        return result.state == outcomes.LOST and entry.lost_before + (
            0 if entry.lost_before >= self.settings.max_lost_attempts else 1
        ) >= self.settings.max_lost_attempts

    def _start_waiting(self) -> None:
        with self._lock:
            while self._waiting and self._active < self.limit:
                entry = self._waiting.popleft()
                self._active += 1
                self._submit(self._launch, entry)

    # -- callbacks, on the worker's event loop -----------------------------------------

    def _notify(self, fn: Callable, *args) -> None:
        """Run ``fn`` on the worker's event loop (or right here when there is none)."""
        if self._hub is None:
            _call_logged(fn, *args)
            return
        self._ready.append((fn, args))
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already due to wake up

    def _drain_ready(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while self._ready:
            fn, args = self._ready.popleft()
            _call_logged(fn, *args)

    def _accept_delivery(self, entry: InFlight, delivery: Callbacks) -> None:
        if delivery.accepted or delivery.accept is None:
            return
        delivery.accepted = True
        delivery.accept(entry.pod_name or entry.job_name, time.monotonic())

    def _deliver(self, entry: InFlight, delivery: Callbacks, result: outcomes.Outcome,
                 error: Exception | None) -> None:
        self._deliver_outcome(entry, delivery, result, error)
        label = OUTCOME_LABELS.get(result.state, "failed")
        if result.state == outcomes.LOST and not self._final_loss(entry, result):
            label = "requeued"
        metrics.TASK_OUTCOMES.labels(entry.spec.queue, entry.spec.name, label).inc()
        if entry.ended_at is not None and result.state in outcomes.TASK_STATES:
            metrics.ACK_SECONDS.observe(time.monotonic() - entry.ended_at)

    def _deliver_outcome(self, entry: InFlight, delivery: Callbacks, result: outcomes.Outcome,
                         error: Exception | None) -> None:
        spec = entry.spec
        state = result.state
        if state in outcomes.TASK_STATES or state == outcomes.TIME_LIMIT:
            self._accept_delivery(entry, delivery)
        where = f"pod {entry.pod_name}" if entry.pod_name else f"Job {entry.job_name}"
        if state == outcomes.SUCCESS:
            self.counters["succeeded"] += 1
            log.info("Task %s[%s] succeeded in %ss: %s", spec.name, spec.task_id,
                     result.runtime, result.result)
            delivery.success((0, result.result, result.runtime))
        elif state in (outcomes.FAILURE, outcomes.RETRY, outcomes.REJECTED, outcomes.IGNORED):
            exc = self._task_exception(result)
            if state == outcomes.FAILURE:
                self.counters["failed"] += 1
                log.error("Task %s[%s] raised %r in %s", spec.name, spec.task_id, exc, where)
            else:
                log.info("Task %s[%s] %s in %s", spec.name, spec.task_id, state.lower(), where)
            delivery.success((1, exception_info(exc, result.traceback), result.runtime))
        elif state == outcomes.TIME_LIMIT:
            self.counters["failed"] += 1
            log.error("Task %s[%s]: hard time limit, %s", spec.name, spec.task_id, result.reason)
            if delivery.timeout:
                delivery.timeout(False, spec.time_limit)
        elif state == TERMINATED:
            delivery.error(exception_info(Terminated(entry.terminate_signal or signals.SIGTERM)))
        elif state == PENDING_TIMEOUT:
            self.counters["failed"] += 1
            delivery.error(exception_info(PodPendingTimeout(
                f"pod of Job {entry.job_name} did not start within "
                f"{self.settings.pending_timeout:.0f}s: {result.reason}")))
        elif state == LAUNCH_FAILED:
            self.counters["failed"] += 1
            delivery.error(exception_info(error or TaskLaunchError(result.reason)))
        elif state == REQUEUE:
            self.counters["requeued"] += 1
            delivery.error(exception_info(WorkerLostError(f"requeued: {result.reason}")))
        elif state == outcomes.LOST:
            self._deliver_lost(entry, delivery, result, where)

    def _deliver_lost(self, entry: InFlight, delivery: Callbacks, result: outcomes.Outcome,
                      where: str) -> None:
        spec = entry.spec
        self.counters["lost"] += 1
        attempts = self.settings.max_lost_attempts
        if self._final_loss(entry, result):
            self.counters["failed"] += 1
            message = (f"task lost {attempts} time(s), giving up; last attempt ({where}): "
                       f"{result.reason}")
            log.error("Task %s[%s] %s", spec.name, spec.task_id, message)
            delivery.error(exception_info(TaskLostError(message)))
        else:
            self.counters["requeued"] += 1
            log.warning("Task %s[%s]: %s lost (%s); requeueing (attempt %d of %d)", spec.name,
                        spec.task_id, where, result.reason, entry.lost_before + 1, attempts)
            delivery.error(exception_info(WorkerLostError(f"{where} lost: {result.reason}")))

    def _task_exception(self, result: outcomes.Outcome) -> BaseException:
        original = None
        if result.exception:
            try:
                original = self.app.backend.exception_to_python(result.exception)
            except Exception as exc:  # a class we cannot rebuild: keep its text
                original = TaskLaunchError(f"{result.exc_module}.{result.exc_type}: {result.exc_args} "
                                           f"({exc})")
        if result.state == outcomes.RETRY:
            return Retry(message=result.result or None, exc=original, when=result.when)
        if result.state == outcomes.REJECTED:
            return Reject(reason=original, requeue=result.requeue)
        if result.state == outcomes.IGNORED:
            return Ignore()
        return original or RuntimeError("the task failed without an exception")


def broker_warnings(app) -> list[str]:
    """Start-up checks of broker settings that would make long Jobs run twice."""
    transport = (app.conf.broker_url or "").split("://", 1)[0].split("+")[0]
    if transport not in ("amqp", "pyamqp", "amqps"):
        return []
    timeouts = {queue.name: (queue.queue_arguments or {}).get("x-consumer-timeout")
                for queue in app.amqp.queues.consume_from.values()}
    missing = sorted(name for name, value in timeouts.items() if value is None)
    warnings = [f"queue {name}: x-consumer-timeout is {value} ms; a Job running longer is "
                "redelivered (and adopted) when RabbitMQ closes the channel"
                for name, value in sorted(timeouts.items()) if value is not None]
    if missing:
        warnings.append(f"RabbitMQ closes a channel whose delivery is not acked within its "
                        f"consumer_timeout (30 minutes by default); queues {', '.join(missing)} set no "
                        "x-consumer-timeout, so raise consumer_timeout above your longest task")
    return warnings


def exception_info(exc: BaseException, traceback_text: str | None = None) -> ExceptionInfo:
    """An :class:`ExceptionInfo` for ``exc`` (Celery needs one built from a raise)."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo()
    # As after the trip from a prefork child: the exception itself, not billiard's
    # local wrapper (whose repr would reach events and Flower).
    einfo.exception = exc
    if traceback_text:
        einfo.traceback = traceback_text
    return einfo


def _timestamp(value: str | None) -> float:
    from datetime import datetime

    if not value:
        return time.time()
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


KEPT_METADATA = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp")


def _slim(obj: dict | None, status_of: Callable[[dict], dict] = dict) -> dict | None:
    """What the pool reads of a Job or pod it tracks: its identity and (some of) its status."""
    if obj is None:
        return None
    metadata = obj["metadata"]
    return {"metadata": {key: metadata[key] for key in KEPT_METADATA if key in metadata},
            "status": status_of(obj.get("status") or {})}


def _pod_status(status: dict) -> dict:
    """The parts of a pod's status that :mod:`.outcome` reads: phase, reason and message,
    the PodScheduled and DisruptionTarget conditions, and each container's state."""
    slim = {key: status[key] for key in ("phase", "reason", "message") if key in status}
    conditions = [c for c in status.get("conditions") or []
                  if c.get("type") in ("PodScheduled", "DisruptionTarget")]
    if conditions:
        slim["conditions"] = conditions
    if status.get("containerStatuses"):
        slim["containerStatuses"] = [{"name": c.get("name"), "state": c.get("state") or {}}
                                     for c in status["containerStatuses"]]
    return slim


def _redelivered(spec: TaskSpec) -> bool:
    return bool((spec.request.get("delivery_info") or {}).get("redelivered"))


def _attempt_of(job: dict) -> int:
    try:
        return int((job["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, "1"))
    except ValueError:
        return 1


def _call_logged(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("k8s-celery callback %s failed", getattr(fn, "__name__", fn))


def _log_unexpected(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("k8s-celery background call failed", exc_info=future.exception())


def _guess_app_name(app) -> str | None:
    """The ``-A`` value the worker was started with, for the pods to load."""
    import sys

    argv = sys.argv
    for index, arg in enumerate(argv):
        if arg in ("-A", "--app") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
        if arg.startswith("-A") and len(arg) > 2:
            return arg[2:]
    return None
