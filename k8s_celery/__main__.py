"""``python -m k8s_celery`` is ``k8s-celery``."""

import sys

from .cli import main

sys.exit(main())
