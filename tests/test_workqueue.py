"""The work queue: deduplicated keys, never two workers on one key, delayed adds."""

from __future__ import annotations

import threading
import time

from k8s_celery.testing import wait_until
from k8s_celery.workqueue import WorkQueue


def test_a_key_is_never_processed_twice_at_once_and_an_add_during_processing_reruns_it():
    active: dict[str, int] = {}
    overlap: list[str] = []
    calls: list[str] = []
    release = threading.Event()
    lock = threading.Lock()

    def reconcile(key: str) -> None:
        with lock:
            active[key] = active.get(key, 0) + 1
            if active[key] > 1:
                overlap.append(key)
            calls.append(key)
        if len(calls) == 1:
            release.wait(5)
        with lock:
            active[key] -= 1

    queue = WorkQueue(reconcile, workers=4).start()
    try:
        queue.add("a")
        wait_until(lambda: calls == ["a"], message="the first call")
        for _ in range(5):
            queue.add("a")  # while processing: marked dirty once
        release.set()
        wait_until(lambda: len(calls) == 2 and len(queue) == 0, message="one rerun")
        time.sleep(0.2)
        assert calls == ["a", "a"] and not overlap
    finally:
        queue.stop()


def test_keys_are_deduplicated_while_queued():
    seen: list[str] = []
    gate = threading.Event()
    queue = WorkQueue(lambda key: (gate.wait(5), seen.append(key)), workers=1).start()
    try:
        queue.add("blocker")
        time.sleep(0.1)
        for key in ("x", "y", "x", "x", "y"):
            queue.add(key)
        gate.set()
        wait_until(lambda: len(seen) == 3, message="three calls")
        time.sleep(0.2)
        assert seen == ["blocker", "x", "y"]
    finally:
        queue.stop()


def test_add_after_waits():
    seen: list[float] = []
    queue = WorkQueue(lambda key: seen.append(time.monotonic()), workers=1).start()
    try:
        started = time.monotonic()
        queue.add_after("later", 0.3)
        wait_until(lambda: seen, message="the delayed key")
        assert seen[0] - started >= 0.3
    finally:
        queue.stop()


def test_a_failing_reconcile_does_not_stop_the_workers():
    seen: list[str] = []

    def reconcile(key: str) -> None:
        seen.append(key)
        if key == "bad":
            raise RuntimeError("boom")
    queue = WorkQueue(reconcile, workers=1).start()
    try:
        queue.add("bad")
        queue.add("good")
        wait_until(lambda: seen == ["bad", "good"], message="both keys")
    finally:
        queue.stop()
