"""Which consumed queue a message came from: its queue's manifest describes its Job.

Celery's request carries the message's exchange and routing key, not the queue. A
direct exchange routes by equal keys (Celery's default: one exchange per queue,
named like it), a topic exchange by binding patterns (``tasks.#``), a fanout
exchange to every bound queue.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

#: Celery's native delayed delivery (5.5+, RabbitMQ quorum queues) routes a countdown
#: through this exchange with the delay in binary before the routing key.
DELAYED_DELIVERY_EXCHANGE = "celery_delayed_delivery"
# One prefix of 28 binary digits per delay; kombu before 5.7 stacks a new one on a retry.
_DELAY_PREFIX = re.compile(r"^(?:(?:[01]\.){28})+")


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    pattern, words = binding_key.split("."), routing_key.split(".") if routing_key else []

    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        return j < len(words) and pattern[i] in ("*", words[j]) and match(i + 1, j + 1)
    return match(0, 0)


def _bindings(queue) -> list[tuple[str | None, str, str | None]]:
    """``(exchange name, exchange type, binding key)`` of each binding of a kombu Queue."""
    bindings = [(getattr(b.exchange, "name", None), getattr(b.exchange, "type", "direct"), b.routing_key)
                for b in getattr(queue, "bindings", None) or ()]
    exchange = getattr(queue, "exchange", None)
    if exchange is not None and getattr(exchange, "name", None):
        bindings.append((exchange.name, exchange.type or "direct", queue.routing_key))
    return bindings


def _routes(exchange_type: str, binding_key: str | None, routing_key: str | None) -> bool:
    if exchange_type == "fanout":
        return True
    if exchange_type == "topic":
        return topic_matches(binding_key or "", routing_key or "")
    return binding_key == routing_key


def queue_of(app, delivery_info: dict, queues: list[str]) -> str:
    """The name of the consumed queue the message was routed to."""
    routing_key = delivery_info.get("routing_key")
    exchange = delivery_info.get("exchange")
    if routing_key and _DELAY_PREFIX.match(routing_key):
        routing_key = _DELAY_PREFIX.sub("", routing_key)
        if exchange == DELAYED_DELIVERY_EXCHANGE:
            exchange = None  # bound to every queue: the routing key alone tells
    if routing_key in queues and not exchange or routing_key == exchange and routing_key in queues:
        return routing_key
    try:
        consumed = list(app.amqp.queues.consume_from.values())
    except AttributeError:
        consumed = []
    # Without an exchange to go by (a delayed delivery), a fanout binding tells nothing.
    matches = sorted({queue.name for queue in consumed
                      for name, kind, key in _bindings(queue)
                      if (name in (None, "", exchange) if exchange else kind != "fanout")
                      and _routes(kind, key, routing_key)})
    if matches:
        if len(matches) > 1:
            log.debug("message %s/%s matches queues %s; using %s's manifest", exchange, routing_key,
                      matches, matches[0])
        return matches[0]
    if routing_key in queues:
        return routing_key
    return queues[0] if len(queues) == 1 else (routing_key or "celery")
