"""One list+watch of a kind, in its own thread (``client-go``'s reflector).

:class:`Watcher` relists on 410 Gone, restarts a watch that went quiet or dropped
(from the last resourceVersion it saw), and relists every ``resync_period`` so that
a missed event can never strand a task.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Callable

from .cluster import ApiError, KubeApi

log = logging.getLogger(__name__)


EventHandler = Callable[[str, dict], None]
SyncHandler = Callable[[list[dict]], None]


class Watcher:
    """One list+watch of a kind, in its own thread, for the whole process.

    ``on_event(type, obj)`` gets every ADDED/MODIFIED/DELETED event. ``on_sync(objects)``
    gets the complete current list after every (re)list, so that the handler can
    notice objects that vanished while no watch was open.
    """

    def __init__(self, api: KubeApi, path: str, on_event: EventHandler,
                 on_sync: SyncHandler | None = None, label_selector: str | None = None,
                 field_selector: str | None = None, resync_period: float = 300.0,
                 read_timeout: float = 60.0, name: str | None = None):
        self.api = api
        self.path = path
        self.on_event = on_event
        self.on_sync = on_sync
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.resync_period = resync_period
        self.read_timeout = read_timeout
        self.name = name or f"watch {path}"
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self.relists = 0
        self.restarts = 0
        #: The resourceVersion the watch has reached.
        self.resource_version = ""

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._list_then_watch()
                backoff = 0.2
            except Exception as exc:  # any failure: back off, relist
                if self._stop.is_set():
                    break
                log.warning("%s failed (%s); relisting in %.1fs", self.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _list_then_watch(self) -> None:
        objects, self.resource_version = self.api.list(self.path, self.label_selector, self.field_selector)
        self.relists += 1
        if self.on_sync:
            self.on_sync(objects)
        self._synced.set()
        deadline = time.monotonic() + self.resync_period
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._watch(deadline)
            except TimeoutError:
                self.restarts += 1  # quiet or dropped connection: watch again from where it got
            except ApiError as exc:
                if exc.gone:
                    log.info("%s: resourceVersion %s is gone (410); relisting",
                             self.name, self.resource_version)
                    return
                if exc.status == 0:
                    self.restarts += 1
                    self._stop.wait(0.2)
                    continue
                raise

    def _watch(self, deadline: float) -> None:
        """One watch request from :attr:`resource_version`, which follows every event
        (bookmarks too), so that a watch ended by a timeout resumes where it got. The
        server ends it by the resync deadline."""
        # Spread the reconnects of many watchers; never past the next resync.
        timeout = max(1, min(random.randint(240, 300), math.ceil(deadline - time.monotonic())))
        for event_type, obj in self.api.watch(
                self.path, self.resource_version, self.label_selector, self.field_selector,
                timeout_seconds=timeout, read_timeout=self.read_timeout):
            self.resource_version = obj.get("metadata", {}).get("resourceVersion") or self.resource_version
            if event_type != "BOOKMARK":
                self.on_event(event_type, obj)
            if self._stop.is_set():
                break
