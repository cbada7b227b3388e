"""Redis (kombu's Redis transport): keep the reservation of every held message fresh.

kombu redelivers an unacknowledged message once it is older than the transport's
``visibility_timeout``, whether or not its consumer lives. Touching the message's
score in ``unacked_index`` keeps a long Job from being delivered twice while this
worker lives, so a short visibility timeout still recovers fast after a crash.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from ..deliveries import CeleryRequest
from .base import Broker

log = logging.getLogger("k8s_celery.pool")


class RedisBroker(Broker):
    """Refreshes ``unacked_index`` scores a quarter of the visibility timeout apart."""

    def refresh_reservations(self, requests: Iterable[CeleryRequest]) -> float:
        channels: dict[int, tuple[Any, list[str]]] = {}
        for request in requests:
            message = request.message
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
