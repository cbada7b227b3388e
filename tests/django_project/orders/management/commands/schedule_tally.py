"""``manage.py schedule_tally --every N``: the periodic task in django-celery-beat's tables."""
from django.core.management.base import BaseCommand
from django_celery_beat.models import IntervalSchedule, PeriodicTask


class Command(BaseCommand):
    help = "Schedule orders.tasks.tally every N seconds in the database schedule."

    def add_arguments(self, parser):
        parser.add_argument("--every", type=int, default=2)
        parser.add_argument("--name", default="tally orders")

    def handle(self, *args, every, name, **options):
        interval, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
        task, _ = PeriodicTask.objects.update_or_create(
            name=name, defaults={"interval": interval, "task": "orders.tasks.tally", "enabled": True})
        self.stdout.write(f"scheduled {task.name} every {every}s")
