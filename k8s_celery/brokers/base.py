"""The broker interface the pool uses; brokers with nothing special use it as it is."""

from __future__ import annotations

from typing import Iterable

from ..deliveries import CeleryRequest


class Broker:
    """A broker with no visibility timeout to manage and nothing to check at start-up."""

    #: How long to wait before refreshing reservations again when nothing is held.
    idle_interval = 30.0

    def __init__(self, app):
        self.app = app

    def install(self) -> None:
        """Adapt the worker to the broker; called from the pool's constructor, before
        Celery builds the worker's consumer."""

    def warnings(self) -> list[str]:
        """Start-up checks of broker settings that would make long Jobs run twice."""
        return []

    def refresh_reservations(self, requests: Iterable[CeleryRequest]) -> float:
        """Keep the broker from redelivering messages held here; returns seconds until
        the next refresh."""
        return self.idle_interval
