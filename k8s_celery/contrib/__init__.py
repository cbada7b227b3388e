"""Ready-made entry points for applications that need more than ``celery -A module``."""
