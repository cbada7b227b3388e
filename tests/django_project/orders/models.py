"""What the tasks write: orders, and the runs of the periodic tally."""
from django.db import models


class Order(models.Model):
    """An order; ``process_order`` marks it processed and records the pod that did it."""

    item = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=20, default="new")
    processed_by = models.CharField(max_length=253, blank=True)
    created = models.DateTimeField(auto_now_add=True)


class Tally(models.Model):
    """One run of the periodic ``tally`` task: how many orders there were."""

    orders = models.PositiveIntegerField()
    taken_by = models.CharField(max_length=253)
    taken = models.DateTimeField(auto_now_add=True)
