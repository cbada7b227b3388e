"""Which broker family a worker gets (RabbitMQ specifics: test_brokers_amqp.py)."""

from __future__ import annotations

from celery import Celery

from k8s_celery.brokers import for_app, transport_of


def test_the_broker_family_comes_from_the_url(monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    assert transport_of(Celery("r", broker="redis://localhost")) == "redis"
    assert transport_of(Celery("s", broker="sentinel://a;sentinel://b")) == "sentinel"
    assert type(for_app(Celery("a", broker="pyamqp://guest@localhost//"))).__name__ == "AmqpBroker"
    assert type(for_app(Celery("m", broker="memory://"))).__name__ == "Broker"
