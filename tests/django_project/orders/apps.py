"""The orders app: a model the tasks read and write through the ORM."""
from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
