"""Liveness and readiness of the worker, as seen from its event loop.

A worker whose process is alive can still be stuck: its event loop blocked on a
call that never returns, so it consumes nothing and acks nothing. The pool ticks
:class:`Liveness` from a timer on Celery's event loop (the loop that consumes the
broker); the probe endpoints answer from the age of the last tick, so they fail
when the consumer stops turning, not only when the process is gone.
"""

from __future__ import annotations

import threading
import time

#: How often the event loop ticks at most (seconds); shorter for short timeouts.
TICK_INTERVAL = 5.0


class Liveness:
    """When the worker's event loop last ran; ``timeout`` is how stale is still alive."""

    def __init__(self, timeout: float, clock=time.monotonic):
        self.timeout = timeout
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    @property
    def tick_interval(self) -> float:
        return min(TICK_INTERVAL, self.timeout / 4)

    def tick(self) -> None:
        with self._lock:
            self._last = self._clock()

    def age(self) -> float | None:
        """Seconds since the last tick, or None before the loop first ran."""
        with self._lock:
            return None if self._last is None else self._clock() - self._last

    def alive(self) -> tuple[bool, str]:
        """Alive until the loop has been silent for longer than the timeout; a worker
        still starting counts as alive (the probe's initial delay covers start-up)."""
        age = self.age()
        if age is None:
            return True, "event loop not started yet"
        if age > self.timeout:
            return False, f"event loop silent for {age:.0f}s (limit {self.timeout:.0f}s)"
        return True, f"event loop ran {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready once the loop runs (the worker is consuming) and while it is alive."""
        if self.age() is None:
            return False, "event loop not started yet"
        return self.alive()


def probe_app(liveness: Liveness):
    """A WSGI app answering ``/healthz`` (liveness) and ``/readyz`` (readiness)."""
    checks = {"/healthz": liveness.alive, "/readyz": liveness.ready}

    def app(environ, start_response):
        ok, detail = checks[environ["PATH_INFO"]]()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{'ok' if ok else 'failing'}: {detail}\n".encode()]

    app.paths = tuple(checks)
    return app
