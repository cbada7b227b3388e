"""The orders app's tasks, found by ``app.autodiscover_tasks()``."""
import socket

from celery import shared_task
from celery.signals import worker_process_init
from django.db import connection

from .models import Order, Tally

#: Filled once per worker process from the database, as projects warm caches at start.
KNOWN_ITEMS: set[str] = set()


@worker_process_init.connect
def warm_item_cache(**kwargs):
    """Per-process set-up that reads the database (Celery sends this in each pool process)."""
    KNOWN_ITEMS.update(Order.objects.values_list("item", flat=True).distinct()[:1000])


@shared_task
def create_order(item: str, quantity: int) -> int:
    """Create an order through the ORM; its primary key."""
    return Order.objects.create(item=item, quantity=quantity).pk


@shared_task
def process_order(order_id: int) -> str:
    """Read an order, mark it processed by this host (the pod), and save it."""
    order = Order.objects.get(pk=order_id)
    if order.quantity <= 0:
        raise ValueError(f"order {order_id} has no quantity")
    order.status = "processed"
    order.processed_by = socket.gethostname()
    order.save(update_fields=["status", "processed_by"])
    return f"{order.item} x{order.quantity}"


@shared_task
def tally() -> int:
    """The periodic task: count the orders, record the run; the count."""
    count = Order.objects.count()
    Tally.objects.create(orders=count, taken_by=socket.gethostname())
    return count


@shared_task
def database_connection_at_start() -> dict:
    """How the task finds Django's database connection when its body starts.

    Under ``celery -A proj worker`` Celery's Django fix-up closes every database
    connection at ``task_prerun`` (and again at ``task_postrun``), so a task starts
    without one open unless something between prerun and the body opened one.
    """
    open_at_start = connection.connection is not None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend_pid = cursor.fetchone()[0]
    return {"open_at_start": open_at_start, "backend_pid": backend_pid}
