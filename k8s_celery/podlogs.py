"""A task pod's output, read back from Kubernetes and written into the worker's log.

A prefork worker's log holds everything its tasks log and print. Here that output
goes to the task pod's stdout, and the pod goes with its Job right after the ack. So
when an attempt ends, :class:`LogRelay` reads the tail of the task container's log
(``pods/log``, bounded by ``limitBytes``) on its own threads, never on the ack's path,
and writes it line by line into the worker's log, named as Celery names a task
(``name[id]``), before the reconciler deletes the Job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from . import outcome as outcomes
from .cluster import ApiError, KubeApi, object_path

log = logging.getLogger("k8s_celery.pool")
#: The logger the relayed lines go to: a log pipeline can route task output by it.
output_log = logging.getLogger("k8s_celery.task_output")

#: Which outcomes each ``K8S_CELERY_POD_LOGS`` mode relays. A pod that never ran
#: (pending timeout, launch failure), a requeue and a revoke have no output to show.
FAILED_STATES = frozenset({outcomes.FAILURE, outcomes.RETRY, outcomes.REJECTED,
                           outcomes.TIME_LIMIT, outcomes.LOST})
RELAYED_STATES = {"failed": FAILED_STATES,
                  "all": FAILED_STATES | {outcomes.SUCCESS, outcomes.IGNORED},
                  "none": frozenset()}
QUIET_STATES = frozenset({outcomes.SUCCESS, outcomes.IGNORED})

#: Seconds a log read may wait for the next bytes, and may take in all.
READ_TIMEOUT = 10.0
READ_DEADLINE = 30.0
#: Reads waiting for a thread beyond this are skipped (with one warning) rather than
#: let a slow API server hold every ended Job.
MAX_PENDING_READS = 200

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class PodLog:
    """The tail of one container's log."""

    lines: list[str]
    truncated: bool


def read_tail(api: KubeApi, namespace: str, pod: str, container: str, limit: int,
              deadline: float = READ_DEADLINE) -> PodLog:
    """The last ``limit`` bytes of a container's log, whole lines, decoded for a log line.

    ``pods/log`` cuts from the head (``limitBytes``) after taking the tail
    (``tailLines``). Ask for a few more lines than ``limit`` can hold and at most four
    times ``limit`` bytes; when lines are so long that the cap is hit before the end,
    ask again for a quarter of the lines, until the answer ends where the log ends.
    Memory stays within four times ``limit``.
    """
    cap = 4 * limit
    path = object_path("pods", namespace, pod, "log")
    until = time.monotonic() + deadline
    lines = max(limit // 40, 100)
    while True:
        api.rate_limiter.acquire()
        data = _read_capped(api.stream(path, {"container": container, "tailLines": lines + 1,
                                              "limitBytes": cap}, READ_TIMEOUT), cap, until)
        if len(data) < cap or lines == 1:
            break
        lines = max(1, lines // 4)
    return cut_tail(data, limit, lines, capped=len(data) >= cap)


def _read_capped(chunks: Iterator[bytes], cap: int, until: float) -> bytes:
    data = bytearray()
    try:
        for chunk in chunks:
            data += chunk[:cap - len(data)]
            if len(data) >= cap:
                break
            if time.monotonic() > until:
                raise TimeoutError(f"the log read took more than {READ_DEADLINE:.0f}s")
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()
    return bytes(data)


def cut_tail(data: bytes, limit: int, lines_asked: int, capped: bool = False) -> PodLog:
    """Whole lines of the last ``limit`` bytes of ``data``, the answer to a request
    for ``lines_asked + 1`` lines (one more than needed, to know if there was more)."""
    truncated = capped
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) > lines_asked:
        lines = lines[-lines_asked:]
        truncated = True
    kept = b"\n".join(lines)
    if len(kept) > limit:
        kept = kept[-limit:]
        newline = kept.find(b"\n")
        kept = kept[newline + 1:] if 0 <= newline < len(kept) - 1 else kept
        truncated = True
    text = kept.decode("utf-8", "backslashreplace")
    return PodLog([_printable(line) for line in text.split("\n")] if kept else [], truncated)


def _printable(line: str) -> str:
    """A line safe for a log file: no terminal escapes, no stray carriage returns."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line.rstrip("\r"))


class LogRelay:
    """Reads ended attempts' logs on a few threads and writes them into the worker's log."""

    def __init__(self, api: KubeApi, namespace: str, mode: str, limit: int, threads: int = 4):
        self.api = api
        self.namespace = namespace
        self.states = RELAYED_STATES[mode]
        self.limit = limit
        self.enabled = bool(self.states)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="k8s-celery log relay")
        self._pending = 0
        self._lock = threading.Lock()
        self._warned_backlog = False

    def disable(self, reason: str) -> None:
        """Stop relaying (the log read is refused): said once, in the worker's log."""
        if self.enabled:
            self.enabled = False
            log.warning("task output is not relayed into this log: %s", reason)

    def wanted(self, state: str) -> bool:
        return self.enabled and state in self.states

    def relay(self, task: str, pod: dict | None, pod_name: str | None, attempt: int,
              result: outcomes.Outcome, on_done: Callable[[], None]) -> Future | None:
        """Start relaying one attempt's output; ``on_done`` runs when the read is over.

        ``None`` when there is nothing to read (mode, outcome, no pod): call no one.
        ``task`` is ``name[id]``.
        """
        if not self.wanted(result.state) or not pod_name:
            return None
        header = f"{task} pod {pod_name} attempt {attempt}"
        with self._lock:
            if self._pending >= MAX_PENDING_READS:
                if not self._warned_backlog:
                    self._warned_backlog = True
                    log.warning("%d pod logs wait to be read; skipping the output of %s and others "
                                "until the backlog clears", self._pending, header)
                return None
            self._pending += 1
            self._warned_backlog = False
        try:
            future = self._executor.submit(self._relay, header, pod, pod_name, result)
        except RuntimeError:  # shut down: the worker stops
            self._read_over()
            return None
        future.add_done_callback(lambda _: (self._read_over(), on_done()))
        return future

    def _read_over(self) -> None:
        with self._lock:
            self._pending -= 1

    def _relay(self, header: str, pod: dict | None, pod_name: str, result: outcomes.Outcome) -> None:
        level = logging.INFO if result.state in QUIET_STATES else logging.WARNING
        container = outcomes.task_container_name(pod) if pod else None
        summary = describe(result)
        if container is None:
            output_log.log(level, "%s %s; its output is gone with the pod", header, summary)
            return
        try:
            pod_log = read_tail(self.api, self.namespace, pod_name, container, self.limit)
        except ApiError as exc:
            if exc.status in (401, 403):
                self.disable(f"reading pods/log is not allowed ({exc}); grant the worker's Role "
                             "'get' on pods/log")
            output_log.log(level, "%s %s; its output cannot be read: %s", header, summary,
                           _short(exc))
            return
        except Exception as exc:  # the node is away, the read is slow: one line, no storm
            output_log.log(level, "%s %s; its output cannot be read: %s", header, summary, exc)
            return
        if not pod_log.lines:
            output_log.log(level, "%s %s; it printed nothing", header, summary)
            return
        output_log.log(level, "%s %s; its output%s:", header, summary,
                       f" (the last {self.limit} bytes only)" if pod_log.truncated else "")
        for line in pod_log.lines:
            output_log.log(level, "%s| %s", header, line)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Let reads in progress finish (up to ``timeout`` seconds); start no more."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        until = time.monotonic() + timeout
        while self._pending > 0 and time.monotonic() < until:
            time.sleep(0.05)


def describe(result: outcomes.Outcome) -> str:
    """The attempt's outcome in a few words, for the relay's header line."""
    words = {outcomes.SUCCESS: "succeeded", outcomes.IGNORED: "was ignored", outcomes.RETRY: "retried",
             outcomes.REJECTED: "was rejected", outcomes.TIME_LIMIT: "hit its time limit",
             outcomes.LOST: "was lost", outcomes.FAILURE: "failed"}.get(result.state, result.state)
    detail = result.reason or (f"{result.exc_type}: {' '.join(map(str, result.exc_args or []))}".strip()
                               if result.exc_type else "")
    return f"{words} ({detail[:300]})" if detail else words


def _short(exc: ApiError) -> str:
    if exc.not_found:
        return "the pod or its log is gone (deleted, or its node was lost)"
    return str(exc)[:300]
