"""k8s_celery.brokers.amqp: RabbitMQ's consumer timeout as the worker sees it, checked against a real node."""

from __future__ import annotations

import socket
import time

import amqp
import pytest
from celery import Celery
from kombu import Queue

from k8s_celery.brokers import amqp as ct
from k8s_celery.brokers import for_app
from k8s_celery.testing.rabbitmq import RabbitMQServer


@pytest.fixture(autouse=True)
def own_broker_settings(monkeypatch):
    """Celery lets these variables override any app's broker and backend; the session's
    Redis fixture sets them."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)


def app_with(broker: str, **queue_arguments) -> Celery:
    app = Celery("consumer_timeout_test", broker=broker, set_as_current=False)
    app.conf.task_queues = [Queue("kubernetes", queue_arguments=queue_arguments or None)]
    return app


def test_no_warnings_off_rabbitmq():
    assert ct.consumer_timeout_warnings(app_with("redis://127.0.0.1:1/0")) == []
    app = app_with("redis://127.0.0.1:1/0")
    for_app(app).install()
    assert ct.ConsumerTimeoutRecovery not in app.steps["consumer"]


@pytest.mark.parametrize("version, honoured", [((3, 10, 8), False), ((3, 11, 14), False),
                                                ((3, 11, 15), True), ((3, 12, 0), True), ((4, 1, 2), True)])
def test_per_queue_timeouts_by_version(version, honoured):
    assert ct.honours_queue_timeouts(version) is honoured


def test_warning_on_a_rabbitmq_that_ignores_queue_timeouts():
    app = app_with("amqp://guest:guest@127.0.0.1:1//", **{"x-consumer-timeout": 7200000})
    [warning] = ct.consumer_timeout_warnings(app, version=(3, 10, 8))
    assert warning.startswith("queue kubernetes: RabbitMQ 3.10.8 ignores its x-consumer-timeout (7200000 ms)")
    assert "node's consumer_timeout" in warning and "3.11.15+" in warning


def test_warning_on_a_rabbitmq_that_honours_queue_timeouts():
    with_argument = app_with("amqp://guest:guest@127.0.0.1:1//", **{"x-consumer-timeout": 7200000})
    [warning] = ct.consumer_timeout_warnings(with_argument, version=(3, 12, 14))
    assert warning.startswith("queue kubernetes: x-consumer-timeout 7200000 ms on RabbitMQ 3.12.14")
    [warning] = ct.consumer_timeout_warnings(app_with("amqp://guest:guest@127.0.0.1:1//"),
                                                  version=(3, 13, 7))
    assert warning.startswith("queue kubernetes: no x-consumer-timeout; RabbitMQ 3.13.7 applies")


def test_install_adds_the_recovery_step_once():
    app = app_with("amqp://guest:guest@127.0.0.1:1//")
    for_app(app).install()
    for_app(app).install()
    assert list(app.steps["consumer"]).count(ct.ConsumerTimeoutRecovery) == 1


# -- against a real RabbitMQ node -------------------------------------------------------

TIMEOUT_MS, TICK_MS = 1000, 2500


@pytest.fixture(scope="module")
def ticking_rabbitmq():
    """consumer_timeout 1 s, but channels look only every 2.5 s."""
    with RabbitMQServer(consumer_timeout=TIMEOUT_MS, channel_tick_interval=TICK_MS) as server:
        yield server


def seconds_until_channel_closed(server: RabbitMQServer, queue: str, arguments: dict | None = None,
                                 wait: float = 8.0) -> float | None:
    """Consume one message without acking it; seconds until RabbitMQ closes the channel (or None)."""
    connection = amqp.Connection(f"127.0.0.1:{server.port}")
    connection.connect()
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments or {})
        channel.basic_publish(amqp.Message("x"), routing_key=queue)
        received = []
        channel.basic_consume(queue, callback=received.append)
        started = time.monotonic()
        while time.monotonic() - started < wait:
            try:
                connection.drain_events(timeout=0.2)
            except socket.timeout:
                continue
            except amqp.exceptions.PreconditionFailed as exc:
                assert "delivery acknowledgement on channel" in str(exc) and received
                return time.monotonic() - started
        return None
    finally:
        connection.collect()


@pytest.mark.rabbitmq
def test_server_version_is_read_from_the_broker(ticking_rabbitmq):
    announced = ticking_rabbitmq.api("GET", "/api/overview")["rabbitmq_version"]
    assert ct.server_version(app_with(ticking_rabbitmq.url)) == ct.parse_version(announced)


@pytest.mark.rabbitmq
def test_consumer_timeout_fires_at_the_channel_tick(ticking_rabbitmq):
    closed_after = seconds_until_channel_closed(ticking_rabbitmq, "plain")
    assert closed_after is not None, "the channel was not closed"
    # The timeout (1 s) is only compared at a tick of the channel (every 2.5 s).
    assert TICK_MS / 1000 - 0.5 <= closed_after <= 2 * TICK_MS / 1000 + 0.5


@pytest.mark.rabbitmq
def test_x_consumer_timeout_is_honoured_only_from_3_11_15(ticking_rabbitmq):
    version = ct.server_version(app_with(ticking_rabbitmq.url))
    closed_after = seconds_until_channel_closed(ticking_rabbitmq, "with-argument",
                                                {"x-consumer-timeout": 600_000})
    honoured = ct.honours_queue_timeouts(version)
    assert (closed_after is None) is honoured, (version, closed_after)
