"""End to end with a Django project (tests/django_project) on a real PostgreSQL: the pods run
the project's tasks through the ORM, results go to django-celery-results' table, Beat reads
django-celery-beat's database schedule, Flower shows it all."""

from __future__ import annotations

import pytest

from flower_process import Flower
from k8s_celery.testing import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.django]


def test_orm_writes_and_results_in_the_django_result_table(django_project):
    shim = django_project.start_shim()
    created = django_project.send("orders.tasks.create_order", "widget", 3)
    order_id = django_project.task_result(created)["result"]
    assert django_project.sql("SELECT item, quantity, status FROM orders_order WHERE id = %s",
                              (order_id,)) == [("widget", 3, "new")]

    processed = django_project.send("orders.tasks.process_order", order_id)
    result = django_project.task_result(processed)
    assert result["status"] == "SUCCESS" and result["result"] == "widget x3"
    assert result["task_name"] == "orders.tasks.process_order"
    [(status, processed_by)] = django_project.sql(
        "SELECT status, processed_by FROM orders_order WHERE id = %s", (order_id,))
    assert status == "processed" and processed_by.startswith("kc-")  # the pod's hostname
    # the ORM, in a process of its own, sees what the pod wrote
    shown = django_project.manage("shell", "-c", "from orders.models import Order; "
                                  f"o = Order.objects.get(pk={order_id}); print(o.status, o.processed_by)")
    assert shown.strip().splitlines()[-1].split() == [status, processed_by]

    empty = django_project.send("orders.tasks.create_order", "nothing", 0)
    failed = django_project.send("orders.tasks.process_order", django_project.task_result(empty)["result"])
    failure = django_project.task_result(failed)
    assert failure["status"] == "FAILURE" and "has no quantity" in failure["traceback"]
    assert failure["result"]["exc_type"] == "ValueError"
    assert "succeeded" in shim.log() and "orders.tasks.process_order" in shim.log()


def test_task_sent_on_commit_from_django(django_project):
    django_project.start_shim()
    order_id, task_id = django_project.manage("place_order", "gadget", "2").split()
    assert django_project.task_result(task_id)["result"] == "gadget x2"
    assert django_project.sql("SELECT status FROM orders_order WHERE id = %s", (int(order_id),)) == [
        ("processed",)]


def test_pods_handle_database_connections_like_a_celery_worker(django_project):
    """Celery's Django fix-up closes the database connections around each task in a worker
    (``task_prerun``/``task_postrun``); a pod must run the task the same way."""
    django_project.start_shim()
    stock = django_project.start_stock_worker("local")
    in_pod = django_project.task_result(django_project.send("orders.tasks.database_connection_at_start"))
    in_worker = django_project.task_result(
        django_project.send("orders.tasks.database_connection_at_start", queue="local"))
    assert in_worker["worker"] == stock
    assert in_pod["result"]["open_at_start"] == in_worker["result"]["open_at_start"], (in_pod, in_worker)


def test_periodic_task_from_the_database_schedule_runs_as_a_job(django_project, tmp_path):
    shim = django_project.start_shim()
    django_project.manage("schedule_tally", "--every", "2")
    with Flower("proj", django_project.env, tmp_path / "flower.log", cwd=django_project_dir()) as flower:
        beat = django_project.start_beat()
        rows = wait_until(lambda: django_project.sql(
            "SELECT task_id, status, periodic_task_name FROM django_celery_results_taskresult "
            "WHERE task_name = 'orders.tasks.tally' AND status = 'SUCCESS'") or None,
            timeout=90, message=lambda: f"a run of the periodic task:\n{django_project.log('beat')[-3000:]}")
        task_id, _, periodic_name = rows[0]
        assert periodic_name == "tally orders"
        [(taken_by,)] = django_project.sql("SELECT taken_by FROM orders_tally ORDER BY id LIMIT 1")
        assert taken_by.startswith("kc-")
        # "tally orders" exists only in django-celery-beat's tables: beat read them.
        assert "Sending due task tally orders" in django_project.log("beat")
        shown = flower.wait_for_state(task_id, "SUCCESS")
        assert shown["name"] == "orders.tasks.tally" and shown["worker"] == shim.hostname
    beat.terminate()  # Beat writes the runs it counted to the schedule table when it stops
    beat.wait(30)
    [(runs,)] = django_project.sql("SELECT total_run_count FROM django_celery_beat_periodictask "
                                   "WHERE name = 'tally orders'")
    assert runs >= 1


def django_project_dir():
    from django_setup import PROJECT

    return PROJECT
