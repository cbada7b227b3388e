"""The test Django project; its Celery app is loaded with the project, as Celery's guide does."""
from .celery import app as celery_app

__all__ = ("celery_app",)
