"""Nautobot's Celery app with Nautobot's settings loaded: ``-A k8s_celery.contrib.nautobot``.

``nautobot-server celery worker`` loads ``nautobot_config`` (``$NAUTOBOT_CONFIG``) and
sets Django up before Celery imports ``nautobot.core.celery``; a plain ``celery -A
nautobot.core.celery`` does not, and neither would a task pod. Importing this module
does what ``nautobot-server`` does first (``nautobot.setup()``), so both the worker
(``k8s-celery worker -A k8s_celery.contrib.nautobot``) and its pods load the same app
the same way. A worker started with ``nautobot-server celery worker -P custom`` has no
``-A``: its pods load this module unless ``K8S_CELERY_APP`` says otherwise.
"""

import nautobot

nautobot.setup()

from nautobot.core.celery import app  # noqa: E402

__all__ = ["app"]
