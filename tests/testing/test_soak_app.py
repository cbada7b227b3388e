"""The soak's Celery app: messages of a worker SIGKILLed while it held kombu's restore lock
come back within the soak's settle time (kombu keeps the lock 300 s by default)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from kombu import Connection

from k8s_celery.testing.soak_app import app

QUEUE = "soak-restore-lock"

# A worker that took a message (unacknowledged), then was SIGKILLed in the middle of
# restore_visible: it holds the lock exactly as kombu's ``Mutex`` takes it.
DIES_HOLDING_THE_LOCK = textwrap.dedent("""
    import sys, time
    from kombu import Connection
    from k8s_celery.testing.soak_app import app

    options = app.conf.broker_transport_options
    with Connection(sys.argv[1], transport_options=options) as connection:
        message = connection.SimpleQueue(sys.argv[2]).get(timeout=10)
        client = connection.default_channel.client
        assert client.lock("unacked_mutex", timeout=options["unacked_mutex_expire"]).acquire(blocking=False)
        print("holding", flush=True)
        time.sleep(600)
""")


def test_a_worker_killed_holding_the_restore_lock_delays_redelivery_only_briefly(redis_server):
    url = f"{redis_server.url}/5"
    client = redis_server.client(5)
    client.flushdb()
    options = app.conf.broker_transport_options
    with Connection(url, transport_options=options) as connection:
        connection.SimpleQueue(QUEUE).put({"task": "soak.work"})
    worker = subprocess.Popen([sys.executable, "-c", DIES_HOLDING_THE_LOCK, url, QUEUE],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "holding"
    finally:
        worker.kill()
        worker.wait(10)
    assert client.hlen("unacked") == 1 and client.llen(QUEUE) == 0
    assert client.ttl("unacked_mutex") > 0

    # What every live worker does every unacked_restore_interval.
    started = time.monotonic()
    with Connection(url, transport_options=options) as connection:
        qos = connection.default_channel.qos
        while client.llen(QUEUE) == 0 and time.monotonic() - started < 60:
            qos.restore_visible(num=10, interval=1)
            time.sleep(0.5)
    waited = time.monotonic() - started
    assert client.llen(QUEUE) == 1, f"the message was not redelivered in {waited:.0f}s"
    assert waited <= options["visibility_timeout"] + options["unacked_mutex_expire"] + 5
    assert client.hlen("unacked") == 0
