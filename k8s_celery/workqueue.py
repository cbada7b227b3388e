"""A work queue of keys, as client-go's: deduplicated, one worker per key at a time.

Handlers only :meth:`~WorkQueue.add` a key; worker threads take keys and call the
reconcile function. A key added while it is being processed is marked dirty and
processed again afterwards, never by two workers at once, so one place decides per
key and a watch event, a launch and a resync can never race each other.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    """Keys waiting to be reconciled, in the order they were first added."""

    def __init__(self, reconcile: Callable[[Hashable], None], workers: int = 4,
                 name: str = "k8s-celery reconcile"):
        self.reconcile = reconcile
        self.workers = workers
        self.name = name
        self._queue: collections.deque[Hashable] = collections.deque()  # ready, FIFO
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # added again while processing
        self._delayed: list[tuple[float, int, Hashable]] = []  # (due, seq, key) heap
        self._sequence = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def start(self) -> WorkQueue:
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"{self.name} {index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking keys; wait for keys being processed to finish."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def add(self, key: Hashable) -> None:
        with self._cond:
            if self._stopped:
                return
            if key in self._processing:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        """Add ``key`` once ``delay`` seconds have passed."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._sequence), key))
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._processing)

    def _take(self) -> Hashable | None:
        with self._cond:
            while True:
                if self._stopped:
                    return None
                self._promote_due()
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._delayed[0][0] - time.monotonic() if self._delayed else None
                self._cond.wait(wait)

    def _promote_due(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key = heapq.heappop(self._delayed)
            if key not in self._queued and key not in self._processing:
                self._queued.add(key)
                self._queue.append(key)
            elif key in self._processing:
                self._dirty.add(key)

    def _done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if not self._stopped and key not in self._queued:
                    self._queued.add(key)
                    self._queue.append(key)
                    self._cond.notify()

    def _work(self) -> None:
        while True:
            key = self._take()
            if key is None:
                return
            try:
                self.reconcile(key)
            except Exception:  # one key must never stop the workers
                log.exception("reconciling %s failed", key)
            finally:
                self._done(key)
