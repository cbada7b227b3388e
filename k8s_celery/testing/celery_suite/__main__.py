"""``python -m k8s_celery.testing.celery_suite``: see :mod:`.cli`."""

import sys

from .cli import main

sys.exit(main())
