"""What the shim needs from each broker: start-up checks and keeping reservations alive.

``for_app(app)`` picks the broker's family member from the app's broker URL; each
family member is one module (:mod:`.redis`, :mod:`.amqp`).
"""

from __future__ import annotations

from .base import Broker


def transport_of(app) -> str:
    """The broker transport's name (``redis``, ``amqp``, …) from the app's broker URL."""
    url = app.conf.broker_url or ""
    if not isinstance(url, str):  # a list of fail-over URLs
        url = url[0] if url else ""
    return url.split("://", 1)[0].split("+")[0] if "://" in url else url


def for_app(app) -> Broker:
    transport = transport_of(app)
    if transport in ("redis", "rediss", "sentinel"):
        from .redis import RedisBroker

        return RedisBroker(app)
    if transport in ("amqp", "pyamqp", "amqps"):
        from .amqp import AmqpBroker

        return AmqpBroker(app)
    return Broker(app)


__all__ = ["Broker", "for_app", "transport_of"]
