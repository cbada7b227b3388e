"""``manage.py place_order ITEM QUANTITY``: create an order and process it in a task sent
on commit, as a view would (``delay_on_commit``, Celery 5.4+); prints the task id."""
from django.core.management.base import BaseCommand
from django.db import transaction

from orders.models import Order
from orders.tasks import process_order


class Command(BaseCommand):
    help = "Create an order and send process_order for it once the transaction commits."

    def add_arguments(self, parser):
        parser.add_argument("item")
        parser.add_argument("quantity", type=int)

    def handle(self, *args, item, quantity, **options):
        sent = []
        with transaction.atomic():
            order = Order.objects.create(item=item, quantity=quantity)
            transaction.on_commit(lambda: sent.append(process_order.delay(order.pk).id))
        self.stdout.write(f"{order.pk} {sent[0]}")
