"""RabbitMQ (AMQP): what the pool must know about ``consumer_timeout``.

RabbitMQ closes a channel (``406 PRECONDITION_FAILED - delivery acknowledgement on
channel N timed out``) whose oldest unacknowledged delivery is older than the
consumer timeout, and returns its deliveries to their queues. A Job that runs longer
than that keeps its message unacknowledged that long. Two facts, checked on RabbitMQ
3.10.8 (tests/test_consumer_timeout.py, tests/test_rabbitmq_queues_e2e.py):

* Each channel compares only at its *tick* (``channel_tick_interval``, 60 s unless set
  in ``advanced.config``): the close comes up to a minute after the timeout.
* The timeout is the node's ``consumer_timeout`` (``rabbitmq.conf``, 30 minutes by
  default). RabbitMQ reads per-queue ``x-consumer-timeout`` arguments and
  ``consumer-timeout`` policies only from 3.11.15/3.12 on; 3.10 ignores them. No client
  can read the node's value (neither AMQP nor the management API expose it; only
  ``rabbitmqctl environment`` on the node does), so the start-up warning names the
  server version and the queue arguments it honours, not a number it cannot know.

A stock Celery worker stops on that channel error ("Unrecoverable error:
PreconditionFailed", celery/celery#6760): :class:`ConsumerTimeoutRecovery` makes the
worker's consumer treat it as a lost connection instead, so Celery reconnects, the
message comes back (``redelivered``) and the pool adopts the Job still running.
"""

from __future__ import annotations

import logging
import re

from celery import bootsteps

from .base import Broker

log = logging.getLogger(__name__)



AMQP_TRANSPORTS = ("amqp", "pyamqp", "amqps")
#: The first RabbitMQ releases that honour x-consumer-timeout / consumer-timeout policies.
PER_QUEUE_TIMEOUT_SINCE = ((3, 11, 15), (3, 12, 0))
DEFAULT_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000


def is_amqp(app) -> bool:
    """Whether the app's broker is RabbitMQ through py-amqp."""
    url = app.conf.broker_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    return url.split("://", 1)[0].split("+")[0] in AMQP_TRANSPORTS


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """``"3.10.8"`` -> ``(3, 10, 8)``; ``None`` for anything else."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(part) for part in match.groups()) if match else None


def honours_queue_timeouts(version: tuple[int, ...] | None) -> bool | None:
    """Whether a RabbitMQ of this version honours per-queue consumer timeouts (``None``: unknown)."""
    if version is None:
        return None
    if version[:2] == (3, 11):
        return version >= PER_QUEUE_TIMEOUT_SINCE[0]
    return version >= PER_QUEUE_TIMEOUT_SINCE[1]


def server_version(app, timeout: float = 5.0) -> tuple[int, ...] | None:
    """The RabbitMQ version the broker announces when a connection opens."""
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            properties = getattr(connection.connection, "server_properties", None) or {}
    except Exception as exc:  # the worker's own connection reports it later
        log.debug("cannot read the broker's version: %s", exc)
        return None
    version = properties.get("version")
    return parse_version(version.decode() if isinstance(version, bytes) else version)


def consumer_timeout_warnings(app, version: tuple[int, ...] | None = None) -> list[str]:
    """Start-up warnings about the consumer timeout of each consumed queue (``[]`` off RabbitMQ).

    ``version`` is the broker's (read from the broker when not given).
    """
    if not is_amqp(app):
        return []
    version = version if version is not None else server_version(app)
    shown = ".".join(map(str, version)) if version else "of unknown version"
    per_queue = honours_queue_timeouts(version)
    consequence = ("a Job running longer makes RabbitMQ close the worker's channel and requeue its "
                   "deliveries; the worker reconnects and adopts the running Jobs (no second run)")
    node_wide = (f"the node's consumer_timeout (rabbitmq.conf; {DEFAULT_CONSUMER_TIMEOUT_MS // 60000} "
                 "minutes unless set there; clients cannot read it)")
    warnings = []
    for queue in sorted(app.amqp.queues.consume_from.values(), key=lambda q: q.name):
        argument = (queue.queue_arguments or {}).get("x-consumer-timeout")
        if per_queue is False:
            ignored = f" ignores its x-consumer-timeout ({argument} ms) and" if argument is not None else ""
            warnings.append(f"queue {queue.name}: RabbitMQ {shown}{ignored} applies {node_wide} to every "
                            f"queue (per-queue timeouts need 3.11.15+); {consequence}. Raise consumer_timeout "
                            "above your longest task.")
        elif argument is not None:
            warnings.append(f"queue {queue.name}: x-consumer-timeout {argument} ms on RabbitMQ {shown} "
                            "(a consumer-timeout policy with a lower value wins); "
                            f"{consequence}.")
        else:
            warnings.append(f"queue {queue.name}: no x-consumer-timeout; RabbitMQ {shown} applies a "
                            f"consumer-timeout policy if one matches, else {node_wide}; {consequence}. "
                            "Set x-consumer-timeout above your longest task.")
    return warnings


class ConsumerTimeoutRecovery(bootsteps.StartStopStep):
    """A consumer step: the channel close of RabbitMQ's consumer timeout is a lost connection.

    Celery's consumer reconnects on its ``connection_errors`` and stops the worker on
    anything else; ``amqp.exceptions.PreconditionFailed`` (406, the consumer timeout's
    channel close) joins them. Other 406s (e.g. redeclaring a queue with other
    arguments) fail again on reconnect, where Celery's start-up reports them.
    """

    requires = ("celery.worker.consumer.connection:Connection",)
    label = "k8s-celery consumer-timeout recovery"

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        from amqp.exceptions import PreconditionFailed

        if PreconditionFailed not in tuple(c.connection_errors):
            c.connection_errors = tuple(c.connection_errors) + (PreconditionFailed,)


class AmqpBroker(Broker):
    """RabbitMQ: consumer-timeout warnings at start-up, recovery from its channel close."""

    def install(self) -> None:
        """Add :class:`ConsumerTimeoutRecovery` to the worker's consumer (before it is built)."""
        if ConsumerTimeoutRecovery not in self.app.steps["consumer"]:
            self.app.steps["consumer"].add(ConsumerTimeoutRecovery)

    def warnings(self) -> list[str]:
        return consumer_timeout_warnings(self.app)
