"""The liveness clock and its probe endpoints (pure logic)."""

from __future__ import annotations

from k8s_celery.health import Liveness, probe_app


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def call(app, path: str) -> tuple[str, str]:
    status = []
    body = b"".join(app({"PATH_INFO": path}, lambda s, headers: status.append(s)))
    return status[0], body.decode()


def test_starting_worker_is_alive_but_not_ready():
    liveness = Liveness(timeout=60, clock=Clock())
    assert liveness.alive()[0] is True
    assert liveness.ready() == (False, "event loop not started yet")


def test_stale_loop_fails_both_probes():
    clock = Clock()
    liveness = Liveness(timeout=60, clock=clock)
    liveness.tick()
    clock.now += 59
    assert liveness.alive()[0] and liveness.ready()[0]
    clock.now += 2
    assert liveness.alive() == (False, "event loop silent for 61s (limit 60s)")
    assert liveness.ready()[0] is False
    liveness.tick()
    assert liveness.alive()[0]


def test_tick_interval_stays_below_the_timeout():
    assert Liveness(timeout=60).tick_interval == 5
    assert Liveness(timeout=2).tick_interval == 0.5


def test_probe_app_answers_503_with_the_reason():
    clock = Clock()
    liveness = Liveness(timeout=10, clock=clock)
    app = probe_app(liveness)
    assert call(app, "/readyz") == ("503 Service Unavailable", "failing: event loop not started yet\n")
    liveness.tick()
    assert call(app, "/healthz")[0] == "200 OK"
    clock.now += 11
    assert call(app, "/healthz") == ("503 Service Unavailable",
                                      "failing: event loop silent for 11s (limit 10s)\n")
