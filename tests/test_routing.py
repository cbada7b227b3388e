"""Which consumed queue a message came from (pure logic)."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu import Exchange, Queue

from k8s_celery.routing import queue_of, topic_matches


@pytest.mark.parametrize("binding, key, expected", [
    ("reports.#", "reports.daily.pdf", True), ("reports.#", "reports", True),
    ("reports.#", "reportsx.daily", False), ("images.*", "images.thumb", True),
    ("images.*", "images.thumb.big", False), ("a.#.c", "a.c", True), ("a.#.c", "a.x.y.c", True),
    ("a.*.c", "a.c", False), ("#", "anything.at.all", True), ("*.b", "a.b", True),
])
def test_topic_matching(binding, key, expected):
    assert topic_matches(binding, key) is expected


@pytest.fixture
def app(monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    topic, fanout = Exchange("tasks", type="topic"), Exchange("broadcast", type="fanout")
    app = Celery("routing", broker="memory://")
    app.conf.task_queues = [Queue("kubernetes"), Queue("k8s-reports", topic, routing_key="reports.#"),
                            Queue("k8s-images", topic, routing_key="images.*"),
                            Queue("k8s-all", fanout)]
    app.amqp.queues.select(["kubernetes", "k8s-reports", "k8s-images", "k8s-all"])
    return app


def test_queues_are_resolved_by_exchange_and_routing_key(app):
    queues = sorted(app.amqp.queues.consume_from)
    assert queue_of(app, {"exchange": "kubernetes", "routing_key": "kubernetes"}, queues) == "kubernetes"
    assert queue_of(app, {"exchange": "", "routing_key": "kubernetes"}, queues) == "kubernetes"
    assert queue_of(app, {"exchange": "tasks", "routing_key": "reports.q3.pdf"}, queues) == "k8s-reports"
    assert queue_of(app, {"exchange": "tasks", "routing_key": "images.thumb"}, queues) == "k8s-images"
    assert queue_of(app, {"exchange": "broadcast", "routing_key": "x"}, queues) == "k8s-all"


def test_native_delayed_delivery_keeps_the_routing_key_after_its_delay(app):
    queues = sorted(app.amqp.queues.consume_from)
    delay = "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1."
    assert queue_of(app, {"exchange": "celery_delayed_delivery", "routing_key": delay + "kubernetes"},
                    queues) == "kubernetes"
    assert queue_of(app, {"exchange": "celery_delayed_delivery", "routing_key": delay * 2 + "reports.x"},
                    queues) == "k8s-reports"
