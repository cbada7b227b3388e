"""Redis (kombu's Redis transport): keep the reservation of every held message fresh,
and outlive a broker restart.

kombu redelivers an unacknowledged message once it is older than the transport's
``visibility_timeout``, whether or not its consumer lives. Touching the message's
score in ``unacked_index`` keeps a long Job from being delivered twice while this
worker lives, so a short visibility timeout still recovers fast after a crash.

Celery 5.7's consumer, on a lost broker connection, collects the connection and then
closes it. Collecting leaves the connection's default channel closed but in place, and
its transport without a client; closing closes that channel again, whose restore of its
unacknowledged messages then needs the client: ``AttributeError: 'NoneType' object has
no attribute 'hostname'``, an "Unrecoverable error" that stops the worker (a prefork
worker too, whenever Redis restarts while it holds messages; Celery 5.5 did not close).
:class:`CollectedChannelRelease` lets go of that channel once the connection is collected.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from celery import bootsteps

from ..deliveries import CeleryRequest
from .base import Broker

log = logging.getLogger("k8s_celery.pool")


class CollectedChannelRelease(bootsteps.StartStopStep):
    """A consumer step: once Celery collects a lost broker connection, the connection lets
    go of its default channel, so that the close Celery 5.7 adds does not close it again.

    The messages that channel held stay unacknowledged in Redis, and come back after the
    visibility timeout, as they do when a worker dies.
    """

    requires = ("celery.worker.consumer.connection:Connection",)
    label = "k8s-celery collected-channel release"

    def start(self, c) -> None:
        connection = c.connection
        if connection is None or "collect" in vars(connection):
            return
        collect = connection.collect

        def collect_and_release_channel(*args, **kwargs):
            try:
                return collect(*args, **kwargs)
            finally:
                connection._default_channel = None
        connection.collect = collect_and_release_channel


class RedisBroker(Broker):
    """Refreshes ``unacked_index`` scores a quarter of the visibility timeout apart, and
    adds :class:`CollectedChannelRelease` to the worker's consumer."""

    def install(self) -> None:
        if CollectedChannelRelease not in self.app.steps["consumer"]:
            self.app.steps["consumer"].add(CollectedChannelRelease)

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
