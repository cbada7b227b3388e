"""Delivery identity and the table of deliveries in flight (pure logic)."""

from __future__ import annotations

from k8s_celery.deliveries import CeleryRequest, Delivery, DeliveryTable, Phase, delivery_key, redelivered
from k8s_celery.manifest import TaskSpec

BODY = b'[[1, 2], {}, {"callbacks": null}]'


def request(**headers) -> dict:
    return {"id": "t-1", "task": "proj.add", "retries": 0, "delivery_info": {"redelivered": False},
            "properties": {"delivery_tag": "tag-1"}, **headers}


def test_a_redelivery_has_the_key_of_the_first_delivery():
    first = delivery_key("t-1", "proj.add", request(), BODY)
    again = request(delivery_info={"redelivered": True})
    assert delivery_key("t-1", "proj.add", again, BODY) == first
    assert redelivered(again) and not redelivered(request())


def test_new_messages_under_the_same_task_id_have_new_keys():
    first = delivery_key("t-1", "proj.add", request(), BODY)
    keys = {
        "retry": delivery_key("t-1", "proj.add", request(retries=1), BODY),
        "replace": delivery_key("t-1", "proj.other", request(replaced_task_nesting=1), BODY),
        "eta": delivery_key("t-1", "proj.add", request(eta="2030-01-01T00:00:00"), BODY),
        "body": delivery_key("t-1", "proj.add", request(), b"[[3], {}, {}]"),
        "publish": delivery_key("t-1", "proj.add", request(properties={"delivery_tag": "tag-2"}), BODY),
    }
    assert first not in keys.values() and len(set(keys.values())) == len(keys)


def delivery(task_id: str, key: str | None = None, **request_changes) -> Delivery:
    spec = TaskSpec(task_id=task_id, name="proj.add", queue="q", request=request(**request_changes),
                    body=BODY, content_type="application/json", content_encoding="utf-8",
                    delivery=key or delivery_key(task_id, "proj.add", request(**request_changes), BODY))
    return Delivery(spec, CeleryRequest(None, None, None, None), lambda d, s: None)


def test_slots_bound_the_deliveries_launched_and_the_rest_wait_in_order():
    table = DeliveryTable(limit=2)
    entries = [table.add(delivery(f"t{i}")) for i in range(4)]
    assert [e.phase for e in entries] == [Phase.LAUNCHING] * 2 + [Phase.WAITING] * 2
    assert table.slots_used == 2 and table.waiting == 2 and table.next_waiting() is None
    assert table.remove(entries[0]) and table.slots_used == 1
    assert table.next_waiting() is entries[2] and entries[2].phase is Phase.LAUNCHING
    table.resize(5)
    assert table.next_waiting() is entries[3] and table.next_waiting() is None


def test_the_same_message_joins_the_delivery_in_flight():
    table = DeliveryTable(limit=2)
    first = table.add(delivery("t1", key="k"))
    second = table.add(delivery("t1", key="k"))
    assert second is first and len(first.requests) == 2 and table.slots_used == 1


def test_an_ended_delivery_is_not_joined():
    table = DeliveryTable(limit=2)
    first = table.add(delivery("t1", key="k"))
    first.phase = Phase.ENDED
    second = table.add(delivery("t1", key="k"))
    assert second is not first and table.get("k") is second
    table.remove(first)  # the old one's clean-up must not forget the new one
    assert table.get("k") is second


def test_job_names_route_to_their_delivery():
    table = DeliveryTable(limit=1)
    entry = table.add(delivery("t1"))
    table.bind_job(entry)
    assert table.by_job(entry.job_name) is entry
    table.remove(entry)
    assert table.by_job(entry.job_name) is None and len(table) == 0


def test_waiting_deliveries_can_be_dropped():
    table = DeliveryTable(limit=1)
    table.add(delivery("t1"))
    waiting = table.add(delivery("t2"))
    assert table.drop_waiting(waiting) and table.waiting == 0 and table.get(waiting.key) is None
    assert not table.drop_waiting(waiting)


def test_info_names_the_phase():
    entry = delivery("t1")
    assert entry.info()["phase"] == "Queued"
    entry.phase, entry.pod_phase = Phase.TRACKING, "Running"
    assert entry.info()["phase"] == "Running" and entry.info()["delivery"] == entry.key
